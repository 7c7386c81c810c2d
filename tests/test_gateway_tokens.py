"""Token limits over HTTP: a request reserves its prompt (estimated) + max_tokens at admission and
is settled to what it used when it ends, a dropped stream included (issue 14, findings 5 and 6)."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway_helpers import AUTH, KEY, TOKENIZER, counted, make_cfg
from test_gateway_scale import redis_limits  # noqa: F401  (redis_url, the session's redis-server: conftest)
from workbench.testing.fakeserver import FakeServer
from workbench.gateway.server import GatewayServer

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


def cfg_for(tmp_path, fake, key: dict, limits: dict | None = None, tokenizer: str | None = TOKENIZER,
            **sections):
    """Prompts counted exactly ("hello there": 2 tokens, as the fake server's usage says)."""
    return counted(make_cfg(tmp_path, {"fake-model": fake.base_url}, key=key, limits=limits or {}, **sections),
                   tokenizer)


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
    with FakeServer(itl_ms=60, output_tokens=10) as fake, GatewayServer(cfg_for(
            tmp_path, fake, {"tokens_per_minute": 60})) as gw:
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
    with FakeServer(ttft_ms=300, output_tokens=15) as fake, GatewayServer(cfg_for(
            tmp_path, fake, {"tokens_per_minute": 60})) as gw:
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
    with FakeServer(ttft_ms=300, output_tokens=4) as fake, GatewayServer(cfg_for(
            tmp_path, fake, {"tokens_per_minute": 50}, {"assumed_max_tokens": 20})) as gw:
        with ThreadPoolExecutor(6) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: httpx.post(
                gw.base_url + "/chat/completions", json=CHAT, headers=AUTH, timeout=30), range(6))]
        assert statuses.count(200) == 2
        level = gw.app.keys.lookup(f"Bearer {KEY}".encode()).tokens.level
        assert 50 - 2 * 6 <= level < 50 - 2 * 6 + 3  # settled to 2 + 4 each, + refill


def _burst(gw, path: str, body: dict, n: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: httpx.post(gw.base_url + path, json=body, headers=AUTH, timeout=30),
                             range(n)))


def _used(replies) -> int:
    return sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_token_id_prompts_are_counted_by_their_length(tmp_path, backend, request):
    # Issue 31 finding 1: a list of token IDs counted as one token; 30 prompts of 1,000 IDs on a
    # 600-tokens/min key were all admitted (30,030 tokens), in memory and in Redis mode. 1,000
    # IDs can never fit: 429 each; 500 IDs fit once (the fake's usage counts 500 prompt tokens).
    limits = redis_limits(request.getfixturevalue("redis_url")) if backend == "redis" else {}
    with FakeServer(ttft_ms=200, output_tokens=1) as fake, GatewayServer(cfg_for(
            tmp_path, fake, {"tokens_per_minute": 600}, limits, tokenizer=None,
            filter={"enabled": False}, moderation={"policy": None})) as gw:  # else IDs need a tokenizer
        big = _burst(gw, "/completions", {"model": "fake-model", "prompt": [17] * 1000, "max_tokens": 1}, 30)
        assert {r.status_code for r in big} == {429}
        assert "too large" in big[0].json()["error"]["message"]
        t0 = time.monotonic()
        half = _burst(gw, "/completions", {"model": "fake-model", "prompt": [17] * 500, "max_tokens": 1}, 30)
        elapsed = time.monotonic() - t0
    assert [r.status_code for r in half].count(200) == 1
    assert _used(half) <= 1.1 * (600 + 10 * elapsed)  # 10 tokens/s refill


def test_text_prompts_overshoot_the_token_limit_by_at_most_ten_percent(tmp_path):
    # Issue 31 finding 1: 400 words of "a a a ..." were estimated at bytes / 4 = 200 tokens, so
    # two were admitted on a 600 key (802 tokens). Counted by the tokenizer or bounded by bytes,
    # one is admitted, with or without a tokenizer.
    words = " ".join(["a"] * 400)
    for tokenizer in (TOKENIZER, None):
        with FakeServer(ttft_ms=200, output_tokens=1) as fake, GatewayServer(cfg_for(
                tmp_path, fake, {"tokens_per_minute": 600}, tokenizer=tokenizer)) as gw:
            t0 = time.monotonic()
            replies = _burst(gw, "/chat/completions", {"model": "fake-model", "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": words}]}, 10)
            elapsed = time.monotonic() - t0
        assert [r.status_code for r in replies].count(200) == 1, tokenizer
        assert _used(replies) <= 1.1 * (600 + 10 * elapsed)


def test_every_prompt_form_is_counted():
    from workbench.gateway.tokens import PromptCounter, load_tokenizer

    exact = PromptCounter(load_tokenizer(TOKENIZER), media_part_tokens=100, template_tokens=0, message_tokens=0)
    bound = PromptCounter(None, media_part_tokens=100, template_tokens=0, message_tokens=0)
    assert exact.count("completions", {"prompt": [1, 2, 3]}) == (3, True)
    assert exact.count("completions", {"prompt": "hello there", "suffix": "hello"}) == (3, True)
    assert exact.count("embeddings", {"input": ["hello", "hello there"]}) == (3, True)
    chat = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello"},
                                     {"type": "image_url", "image_url": {"url": "data:,x"}}]},
        {"role": "assistant", "name": "hello", "reasoning_content": "hello",
         "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "hello"}}]}
    n, ok = exact.count("chat", chat)
    assert ok and n > 100 + 3  # a media part, three words, the tool call and the schema
    assert bound.count("completions", {"prompt": "héllo"}) == (7, False)  # 6 bytes + 1
    assert PromptCounter(None, template_tokens=30, message_tokens=5).count(
        "chat", {"messages": [{"role": "user", "content": ""}] * 2}) == (40, True)
