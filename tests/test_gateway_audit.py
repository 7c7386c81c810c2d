"""Audit log: no row lost under 1,000 concurrent requests (100 of them streams dropped midway,
over HTTP), a writer that survives rows SQLite refuses, health in /metrics and /ready, start
checks and a full disk (fail-closed), HMAC prompt hashes, private files, the client address,
retention pruning, JSONL export, and the ``workbench gateway`` commands that look after it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway_helpers import AUTH, KEY, METRICS_AUTH, METRICS_KEY, ROOT, WORD_LISTS, make_cfg
from workbench.cli import main as workbench
from workbench.net import free_port as _free_port
from workbench.gateway.app import Gateway
from workbench.gateway.audit import AuditLog
from workbench.gateway.auditdb import COLUMNS, SCHEMA, export_jsonl, prune
from workbench.gateway.config import load_config
from workbench.gateway.keys import KeyStore, hash_key
from workbench.gateway.process import GatewayProcess
from workbench.gateway.server import GatewayServer
from workbench.promscrape import parse, total
from workbench.testing.fakeserver import FakeServer


async def asgi_call(app, path: str, body: bytes, key: str = KEY) -> int:
    """One request straight into the ASGI app (no sockets on the client side)."""
    sent, pending = [], [{"type": "http.request", "body": body, "more_body": False}]
    forever = asyncio.Event()

    async def receive():
        if pending:
            return pending.pop()
        await forever.wait()

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]}
    await app(scope, receive, send)
    return sent[0]["status"]


def test_1000_concurrent_requests_leave_exactly_1000_rows(tmp_path):
    with FakeServer(output_tokens=4) as fake:
        app = Gateway(make_cfg(tmp_path, {"fake-model": fake.base_url}))

        async def burst():
            bodies = []
            for i in range(1000):
                kind = i % 4
                body = {"model": "fake-model", "messages": [{"role": "user", "content": f"req {i}"}],
                        "stream": kind == 1}
                bodies.append(asgi_call(app, "/v1/chat/completions", json.dumps(body).encode(),
                                        key=KEY if kind != 3 else "wrong"))
            statuses = await asyncio.gather(*bodies)
            await app.aclose()  # drains the audit queue
            return statuses

        statuses = asyncio.run(burst())
    assert statuses.count(200) == 750 and statuses.count(401) == 250
    conn = sqlite3.connect(tmp_path / "audit.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM audit").fetchone() == (1000, 1000)
    assert conn.execute("SELECT COUNT(*) FROM audit WHERE status = 200 AND completion_tokens = 4 "
                        "AND key_id = 'test'").fetchone()[0] == 750
    assert conn.execute("SELECT COUNT(*) FROM audit WHERE status = 401 AND key_id IS NULL").fetchone()[0] == 250


def _rows_at(cfg, ages_days: list[float]) -> None:
    log = AuditLog(cfg)
    now = time.time()
    for i, age in enumerate(ages_days):
        log.record((now - age * 86400, f"r{i}", "k", "/v1/chat/completions", "m", 200, 1, 1, 1.0, None,
                    0, None, None, None, None, "127.0.0.1"))
    log.close()


def test_prune_removes_only_rows_past_retention(tmp_path):
    cfg = make_cfg(tmp_path, {}, audit={"retention_days": 180})
    _rows_at(cfg.audit, [0, 10, 179.9, 180.1, 400])
    assert prune(cfg.audit) == 2
    conn = sqlite3.connect(cfg.audit.path)
    assert [r[0] for r in conn.execute("SELECT request_id FROM audit ORDER BY id")] == ["r0", "r1", "r2"]


def test_export_writes_one_json_object_per_row_with_a_timestamp(tmp_path):
    cfg = make_cfg(tmp_path, {})
    _rows_at(cfg.audit, [2, 1, 0])
    out = tmp_path / "audit.jsonl"
    with open(out, "w") as f:
        assert export_jsonl(cfg.audit, f, since=time.time() - 1.5 * 86400) == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["request_id"] for r in lines] == ["r1", "r2"]
    assert lines[0]["time"].endswith("Z") and lines[0]["stream"] is False


def test_prompt_policy_stores_hashes_or_omits(tmp_path):
    with FakeServer() as fake:
        for policy, check in (("store", lambda p: p == "secret plan"), ("hash", lambda p: p.startswith("hmac-sha256:")),
                              ("omit", lambda p: p is None)):
            cfg = make_cfg(tmp_path / policy, {"fake-model": fake.base_url}, audit={"prompt": policy})
            app = Gateway(cfg)

            async def one():
                body = b'{"model": "fake-model", "messages": [{"role": "user", "content": "secret plan"}]}'
                assert await asgi_call(app, "/v1/chat/completions", body) == 200
                await app.aclose()
            asyncio.run(one())
            prompt = sqlite3.connect(cfg.audit.path).execute("SELECT prompt FROM audit").fetchone()[0]
            assert check(prompt), (policy, prompt)


def test_cli_add_key_prune_and_export(tmp_path, capsys):
    conf = tmp_path / "gateway.yaml"
    conf.write_text(yaml.safe_dump({"keys_file": str(tmp_path / "keys.yaml"),
                                    "audit": {"path": str(tmp_path / "a.sqlite"), "retention_days": 30}}))
    assert workbench(["gateway", "--config", str(conf), "add-key", "team-a", "--rpm", "60"]) == 0
    key = capsys.readouterr().out.strip()
    cfg = load_config(conf)
    assert KeyStore(cfg.all_keys()).lookup(f"Bearer {key}".encode()).id == "team-a"
    assert key not in (tmp_path / "keys.yaml").read_text()
    _rows_at(cfg.audit, [1, 40])
    assert workbench(["gateway", "prune", "--config", str(conf)]) == 0
    assert "pruned 1 audit rows" in capsys.readouterr().out
    assert workbench(["gateway", "export-audit", "--config", str(conf)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_unknown_config_key_is_named(tmp_path, capsys):
    conf = tmp_path / "gateway.yaml"
    conf.write_text("filter:\n  actoin: mask\n")
    assert workbench(["gateway", "prune", "--config", str(conf)]) == 2
    assert "unknown key 'filter.actoin'" in capsys.readouterr().err


# ---- issue 14: a writer that survives, health that shows, a database that is checked -----------
def _row(i: int, **over) -> tuple:
    row = dict(zip(COLUMNS, (time.time(), f"r{i}", "k", "/v1/chat/completions", "m", 200, 1, 1, 1.0, None,
                             0, None, None, None, None, "127.0.0.1")))
    return tuple({**row, **over}.values())


def test_writer_survives_rows_sqlite_refuses_and_keeps_every_other_row(tmp_path):
    cfg = make_cfg(tmp_path, {}).audit
    log = AuditLog(cfg)
    bad = [_row(1, prompt_tokens=10 ** 23), _row(2, completion_tokens=-(2 ** 70)),
           _row(3, latency_ms=float("nan")), _row(4, prompt="lone \ud800 surrogate"), _row(5, error=object())]
    for i, row in enumerate([_row(0), *bad, _row(6)]):
        log.record(row)
        if i == 2:
            time.sleep(0.05)  # bad rows alone in a batch, and mixed with good ones
    for i in range(7, 50):
        log.record(_row(i))
    log.close()
    assert (log.written, log.dropped) == (50, 0)
    conn = sqlite3.connect(cfg.path)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM audit").fetchone() == (50, 50)
    assert conn.execute("SELECT prompt_tokens FROM audit WHERE request_id = 'r1'").fetchone() == (None,)
    assert conn.execute("SELECT prompt FROM audit WHERE request_id = 'r4'").fetchone()[0].startswith("lone ")


def test_audit_counters_are_in_metrics_and_ready_is_ok(tmp_path):
    with FakeServer() as fake, GatewayServer(make_cfg(tmp_path, {"fake-model": fake.base_url})) as gw:
        for _ in range(3):
            httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=30, json={
                "model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
        deadline = time.monotonic() + 5
        while gw.app.audit.written < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        m = parse(httpx.get(gw.root_url + "/metrics", headers=METRICS_AUTH).text)
        assert total(m, "workbench_gateway_audit_rows_written_total") >= 3
        assert total(m, "workbench_gateway_audit_rows_dropped_total") == 0
        assert total(m, "workbench_gateway_audit_up") == 1
        assert total(m, "workbench_gateway_audit_disk_free_bytes") > 0
        r = httpx.get(gw.root_url + "/ready")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


@contextlib.contextmanager
def read_only(path):
    """A file no write can reach: chmod for a user, the immutable attribute for root."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        yield
        os.chmod(path, 0o600)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i: no way to make a file read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _start(conf, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "workbench.gateway", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **popen)


def _config_file(tmp_path, port: int, upstream: str, **audit) -> Path:
    conf = tmp_path / "gateway.yaml"
    conf.write_text(yaml.safe_dump({
        "port": port, "upstreams": {"fake-model": {"base_url": upstream}},
        "keys": [{"id": "test", "sha256": hash_key(KEY)},
                 {"id": "prometheus", "sha256": hash_key(METRICS_KEY), "role": "metrics"}],
        "filter": {"word_lists": WORD_LISTS},
        "audit": {"path": str(tmp_path / "audit.sqlite"), **audit}}))
    return conf


@pytest.mark.parametrize("case", ["read_only", "no_space"])
def test_gateway_refuses_to_start_on_an_audit_database_it_cannot_write(tmp_path, case):
    db = tmp_path / "audit.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    db.chmod(0o600)  # already private: what stops the start is the write, not the chmod
    conf = _config_file(tmp_path, _free_port("127.0.0.1"), "http://127.0.0.1:9/v1",
                        min_free_mb=1e12 if case == "no_space" else 0)
    guard = read_only(db) if case == "read_only" else contextlib.nullcontext()
    with guard:
        proc = _start(conf)
        try:
            _, err = proc.communicate(timeout=30)  # the old gateway started and served: a timeout
        finally:
            proc.kill()
    assert proc.returncode == 2
    assert ("cannot write" in err and str(db) in err) if case == "read_only" else "below audit.min_free_mb" in err


def test_full_disk_fails_ready_and_fail_closed_refuses_requests(tmp_path):
    # The gateway in a process whose files cannot grow past 48 KiB (RLIMIT_FSIZE): its audit
    # database fills up after a few requests, as on a full disk.
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    port = _free_port("127.0.0.1")
    with FakeServer() as fake:
        conf = _config_file(tmp_path, port, fake.base_url, fail_closed=True, retry_s=0.1, min_free_mb=0,
                            journal_mode="delete", prompt="store")  # WAL would free space at each retry
        with GatewayProcess(conf, port, ready_path="/ready", env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=limit_files, log_path=tmp_path / "gateway.log"):
            base = f"http://127.0.0.1:{port}"
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 2000}]}
            statuses = []
            for _ in range(100):
                r = httpx.post(base + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "audit_unavailable"
                    break
            assert statuses[0] == 200 and statuses[-1] == 503, statuses
            ready = httpx.get(base + "/ready", timeout=5)
            assert ready.status_code == 503 and "audit writes failing" in ready.json()["reason"]
            m = parse(httpx.get(base + "/metrics", headers=METRICS_AUTH, timeout=5).text)
            assert total(m, "workbench_gateway_audit_up") == 0
            assert total(m, "workbench_gateway_audit_backlog_rows") >= 1  # held for a retry, not lost
            assert httpx.get(base + "/health", timeout=5).status_code == 200  # alive, not ready


def test_prompt_hash_is_an_hmac_files_are_private_and_rows_carry_the_client(tmp_path, monkeypatch):
    import hashlib
    import hmac

    body = {"model": "fake-model", "messages": [{"role": "user", "content": "secret plan"}]}
    with FakeServer() as fake:
        with GatewayServer(make_cfg(tmp_path / "file", {"fake-model": fake.base_url})) as gw:
            assert httpx.post(gw.base_url + "/chat/completions", json=body, headers=AUTH).status_code == 200
            gw.app.audit.close()
        monkeypatch.setenv("GW_TEST_SECRET", "s" * 32)
        with GatewayServer(make_cfg(tmp_path / "env", {"fake-model": fake.base_url},
                                    audit={"hash_secret_env": "GW_TEST_SECRET"})) as gw_env:
            assert httpx.post(gw_env.base_url + "/chat/completions", json=body, headers=AUTH).status_code == 200
            gw_env.app.audit.close()
    for g, secret in ((gw, (tmp_path / "file/audit.sqlite.key").read_bytes().strip()), (gw_env, b"s" * 32)):
        prompt, client = sqlite3.connect(g.cfg.audit.path).execute("SELECT prompt, client FROM audit").fetchone()
        assert prompt == "hmac-sha256:" + hmac.new(secret, b"secret plan", hashlib.sha256).hexdigest()
        assert prompt != "hmac-sha256:" + hashlib.sha256(b"secret plan").hexdigest()
        assert client == "127.0.0.1"
    files = [p for p in (tmp_path / "file").iterdir() if p.name.startswith("audit.sqlite")]
    assert {p.name for p in files} >= {"audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm", "audit.sqlite.key"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}


def test_an_old_database_gains_the_client_column(tmp_path):
    db = tmp_path / "audit.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA.replace(",\n    client TEXT                    -- the client's address (the proxy's, "
                                      "behind one)", ""))
    conn.close()
    assert "client" not in {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(audit)")}
    log = AuditLog(make_cfg(tmp_path, {}).audit)
    log.record(_row(0))
    log.close()
    assert sqlite3.connect(db).execute("SELECT client FROM audit").fetchone() == ("127.0.0.1",)


def test_1000_concurrent_requests_with_100_dropped_streams_leave_one_row_each_over_http(tmp_path):
    """The issue's "done when": one row per request, and a dropped stream's row holds the tokens
    it was sent (at least what the client read, less than the whole reply), never NULL."""
    import aiohttp

    from workbench.testing.fakeserver import FakeServerProcess

    async def burst(base: str) -> list[tuple]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            async def one(i: int) -> tuple:
                kind = ("drop", "stream", "stream", "stream", "stream", "json", "json", "json", "json",
                        "nokey")[i % 10]
                body = {"model": "fake-model", "messages": [{"role": "user", "content": f"request {i}"}],
                        "stream": kind in ("drop", "stream"), "max_tokens": 200 if kind == "drop" else 20}
                headers = AUTH if kind != "nokey" else {"Authorization": "Bearer wb-wrong"}
                async with session.post(base + "/chat/completions", json=body, headers=headers) as r:
                    seen = 0
                    if kind == "drop":
                        async for line in r.content:
                            seen += b'"content":"tok ' in line
                            if seen == 3:
                                break
                        r.close()  # hang up mid-stream
                    else:
                        await r.read()
                    return kind, r.status, r.headers.get("x-request-id"), seen
            return await asyncio.gather(*(one(i) for i in range(1000)))

    # Replies of 20 tokens; a dropped stream would be 200 tokens (4 s) and is dropped after 3.
    with FakeServerProcess(output_tokens=200, itl_ms=20) as fake, GatewayServer(
            make_cfg(tmp_path, {"fake-model": fake.base_url})) as gw:
        results = asyncio.run(burst(gw.base_url))
        gw.app.audit.close()
    conn = sqlite3.connect(gw.cfg.audit.path)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM audit").fetchone() == (1000, 1000)
    rows = {r[0]: r[1:] for r in conn.execute("SELECT request_id, status, completion_tokens, stream FROM audit")}
    by_kind: dict[str, list] = {}
    for kind, status, rid, seen in results:
        by_kind.setdefault(kind, []).append((status, rid, seen))
    assert [s for s, _, _ in by_kind["nokey"]] == [401] * 100
    assert conn.execute("SELECT COUNT(*) FROM audit WHERE status = 401 AND key_id IS NULL").fetchone() == (100,)
    for kind, stream in (("stream", 1), ("json", 0)):
        assert len(by_kind[kind]) == 400
        assert all(status == 200 and rows[rid] == (200, 20, stream) for status, rid, _ in by_kind[kind])
    assert len(by_kind["drop"]) == 100
    for status, rid, seen in by_kind["drop"]:
        row_status, tokens, _ = rows[rid]
        assert status == 200 and seen == 3 and row_status == 499 and 3 <= tokens < 200, rows[rid]


def test_forwarded_for_is_recorded_as_the_client_only_from_a_trusted_proxy(tmp_path):
    """By default X-Forwarded-For is ignored: a client cannot write another address into its audit
    row (uvicorn alone would believe any local peer). With ``http.trusted_proxies`` it is read."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    spoof = {**AUTH, "X-Forwarded-For": "203.0.113.9"}
    clients = {}
    with FakeServer() as fake:
        for name, http in (("default", {}), ("proxied", {"trusted_proxies": ["127.0.0.1"]})):
            cfg = make_cfg(tmp_path / name, {"fake-model": fake.base_url}, http=http)
            with GatewayServer(cfg) as gw:
                assert httpx.post(gw.base_url + "/chat/completions", json=body, headers=spoof).status_code == 200
                gw.app.audit.close()
            clients[name] = sqlite3.connect(cfg.audit.path).execute("SELECT client FROM audit").fetchone()[0]
    assert clients == {"default": "127.0.0.1", "proxied": "203.0.113.9"}
