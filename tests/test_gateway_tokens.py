"""Token limits over HTTP: a request reserves its prompt (estimated) + max_tokens at admission and
is settled to what it used when it ends, a dropped stream included (issue 14, findings 5 and 6)."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from gateway_helpers import AUTH, KEY, make_cfg
from workbench.testing.fakeserver import FakeServer
from workbench.gateway.server import GatewayServer

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


def drop_after(gw, n_tokens: int, body: dict) -> tuple[int, str | None]:
    """Stream, read n_tokens text events, hang up. (status, x-request-id)."""
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", gw.base_url + "/chat/completions", json={**body, "stream": True}, headers=AUTH) as r:
        if r.status_code != 200:
            return r.status_code, None
        seen = 0
        for line in r.iter_lines():
            if '"content":"tok ' in line:
                seen += 1
                if seen == n_tokens:
                    break
        return 200, r.headers["x-request-id"]


def test_streams_dropped_before_the_end_are_charged_the_tokens_they_got(tmp_path):
    # 60 tokens a minute; each stream would be 10 tokens and is dropped after 9. A stream reserves
    # 3 (prompt estimate) + 10 and is charged 3 + 9, so ~5 of 12 get through (the old gateway let
    # all 12 through, charged nothing and audited NULL tokens).
    with FakeServer(itl_ms=60, output_tokens=10) as fake, GatewayServer(make_cfg(
            tmp_path, {"fake-model": fake.base_url}, key={"tokens_per_minute": 60})) as gw:
        results = [drop_after(gw, 9, {**CHAT, "max_tokens": 10}) for _ in range(12)]
        served = [rid for status, rid in results if status == 200]
        assert 4 <= len(served) <= 6, results
        assert [s for s, _ in results].count(429) == 12 - len(served)
        gw.app.audit.close()
    conn = sqlite3.connect(gw.cfg.audit.path)
    got = {r[0]: r[1:] for r in conn.execute(
        "SELECT request_id, status, completion_tokens FROM audit WHERE status != 429")}
    assert got == {rid: (499, 9) for rid in served}


def test_concurrent_requests_cannot_overdraw_the_token_limit(tmp_path):
    # 40 at once against 60 tokens a minute, each using 2 + 15: the old gateway admitted 30 of
    # them (510 tokens) because usage was only debited after the replies.
    with FakeServer(ttft_ms=300, output_tokens=15) as fake, GatewayServer(make_cfg(
            tmp_path, {"fake-model": fake.base_url}, key={"tokens_per_minute": 60})) as gw:
        t0 = time.monotonic()

        def one(_):
            return httpx.post(gw.base_url + "/chat/completions", json={**CHAT, "max_tokens": 15},
                              headers=AUTH, timeout=30)
        with ThreadPoolExecutor(40) as pool:
            replies = list(pool.map(one, range(40)))
        elapsed = time.monotonic() - t0
    used = sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)
    assert {r.status_code for r in replies} == {200, 429}
    assert used <= 60 + elapsed  # the bucket refills 1 token a second


def test_a_request_without_max_tokens_reserves_the_assumed_length(tmp_path):
    # assumed_max_tokens 20: each request reserves 3 + 20, so 50 tokens admit two at once, not more
    with FakeServer(ttft_ms=300, output_tokens=4) as fake, GatewayServer(make_cfg(
            tmp_path, {"fake-model": fake.base_url}, key={"tokens_per_minute": 50},
            limits={"assumed_max_tokens": 20})) as gw:
        with ThreadPoolExecutor(6) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: httpx.post(
                gw.base_url + "/chat/completions", json=CHAT, headers=AUTH, timeout=30), range(6))]
        assert statuses.count(200) == 2
        level = gw.app.keys.lookup(f"Bearer {KEY}".encode()).tokens.level
        assert 50 - 2 * 6 <= level < 50 - 2 * 6 + 3  # settled to 2 + 4 each, + refill
