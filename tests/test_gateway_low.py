"""Issue 31, low findings 9-12, 14-16, each with its regression test."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway_helpers import (AUTH, KEY, RawUpstream, ScriptedUpstream, chat_reply, chunk_event, make_cfg,
                             sse_events)
from test_gateway_http import FAST, GatewayProcess
from workbench.gateway.keys import hash_key
from workbench.gateway.server import GatewayServer
from workbench.net import free_port
from workbench.testing.fakeserver import FakeServer

CHAT = {"model": "raw", "messages": [{"role": "user", "content": "hello there"}]}


def post(gw, body, **kw):
    return httpx.post(gw.base_url + "/chat/completions", json=body, headers=AUTH, timeout=30, **kw)


# ---- 11: a malformed request line gets a 400, not a traceback ---------------------------------
@pytest.mark.parametrize("line", [b"GET http:// HTTP/1.1", b"GET /" + b"a" * 70000 + b" HTTP/1.1"])
def test_a_malformed_request_line_is_refused_with_400(tmp_path, line, caplog):
    with GatewayServer(make_cfg(tmp_path, {})) as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(line + b"\r\nhost: x\r\n\r\n")
            raw = s.recv(4096)
    assert raw.startswith(b"HTTP/1.1 4") and b'"code":"' in raw
    assert "Traceback" not in caplog.text and "AttributeError" not in caplog.text


# ---- 12: an empty keys file is not "no keys"; debts survive a reload --------------------------
def test_an_empty_keys_file_keeps_the_keys_and_their_debts(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"id": "test", "sha256": hash_key(KEY), "requests_per_minute": 2}]))
    with ScriptedUpstream(["ok"]) as up:
        cfg = make_cfg(tmp_path, {"scripted": up.base_url})
        cfg = cfg.model_copy(update={"keys": [], "keys_file": str(keys), "keys_reload_s": 0.1})
        with GatewayServer(cfg) as gw:
            body = {"model": "scripted", "messages": CHAT["messages"]}
            assert [post(gw, body).status_code for _ in range(3)] == [200, 200, 429]
            keys.write_text("")  # a half-written file, as a non-atomic writer leaves it
            time.sleep(0.5)
            assert post(gw, body).status_code == 429  # still known, and still in debt
            keys.write_text(yaml.safe_dump([{"id": "test", "sha256": hash_key(KEY), "requests_per_minute": 2}]))
            time.sleep(0.5)
            assert post(gw, body).status_code == 429  # the same key again: its spent requests stay spent


def test_add_key_writes_the_keys_file_atomically(tmp_path, monkeypatch):
    from workbench.gateway import cli

    cfgfile = tmp_path / "gateway.yaml"
    cfgfile.write_text(yaml.safe_dump({"keys_file": str(tmp_path / "keys.yaml"), "filter": {"enabled": False},
                                       "audit": {"path": str(tmp_path / "a.sqlite")}}))
    writes = []
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: writes.append(self.name) or real(self, *a, **k))
    args = type("A", (), {"config": str(cfgfile), "id": "a", "rpm": None, "tpm": None, "metrics": False})
    assert cli._add_key(args) == 0
    assert writes == ["keys.yaml.tmp"] and yaml.safe_load((tmp_path / "keys.yaml").read_text())[0]["id"] == "a"


# ---- 14: other output fields -----------------------------------------------------------------
def test_tool_call_names_and_content_parts_are_filtered(tmp_path):
    msg = {"content": [{"type": "text", "text": "say badword"}],
           "tool_calls": [{"id": "c", "type": "function", "function": {"name": "badword", "arguments": "{}"}}]}
    with RawUpstream(chat_reply(msg)) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": "mask"})) as gw:
        out = post(gw, CHAT).json()["choices"][0]["message"]
    assert "badword" not in json.dumps(out)
    assert out["content"][0]["text"] == "say ***" and out["tool_calls"][0]["function"]["name"] == "***"


@pytest.mark.parametrize("action", ["mask", "block"])
def test_unparsable_and_bom_prefixed_events_are_filtered(tmp_path, action):
    chunks = [b"\xef\xbb\xbf" + chunk_event({"content": "badword"}), b"data: {not json badword\n\n",
              chunk_event({}, "stop"), b"data: [DONE]\n\n"]
    with RawUpstream(chunks=chunks) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": action})) as gw:
        text = post(gw, {**CHAT, "stream": True}).text
    assert "badword" not in text
    if action == "block":
        assert sse_events(text)[-2]["error"]["code"] == "content_filter"


# ---- 16: a revoked key's stream ends; shutdown cancels without tracebacks ---------------------
def test_a_revoked_keys_open_stream_is_ended(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"id": "test", "sha256": hash_key(KEY)}]))
    with ScriptedUpstream([f"t{i} " for i in range(60)], model="raw", delay_s=0.05) as up:
        cfg = make_cfg(tmp_path, {"raw": up.base_url})
        cfg = cfg.model_copy(update={"keys": [], "keys_file": str(keys), "keys_reload_s": 0.1})
        with GatewayServer(cfg) as gw:
            def revoke():
                time.sleep(0.5)
                keys.write_text("[]\n")
            threading.Thread(target=revoke).start()
            t0 = time.monotonic()
            text = post(gw, {**CHAT, "stream": True}).text
            took = time.monotonic() - t0
    events = sse_events(text)
    assert took < 2.5  # the whole stream would take 3 s
    assert events[-2]["error"]["code"] == "invalid_api_key" and events[-1] == "[DONE]"


def test_requests_cancelled_at_shutdown_log_no_traceback(tmp_path):
    with FakeServer(itl_ms=100, output_tokens=100) as fake, GatewayProcess(
            tmp_path, fake.base_url, http={**FAST, "graceful_shutdown_s": 0.5}) as gw:
        def stream():
            try:
                with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=AUTH, timeout=30, json={
                        "model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass
        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1)
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(10)
        for t in threads:
            t.join(10)
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log, log[-2000:]


# ---- 15: workers: N fit the cap to the open-file limit ---------------------------------------
def test_the_connection_cap_fits_the_open_file_limit():
    import resource

    from workbench.gateway.config import GatewayConfig
    from workbench.gateway.http import GatewayHttpProtocol

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    try:
        proto = GatewayHttpProtocol.configured(GatewayConfig.model_validate({"http": {"max_client_connections": 1024}}))
        assert proto.max_connections == 300 - 64  # the cap answers 503 / makes room before accept() fails
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_workers_raise_the_open_file_limit_before_they_start(tmp_path, monkeypatch):
    from workbench.gateway import server, workers

    seen = []
    monkeypatch.setattr(server, "raise_fd_limit", lambda n: seen.append(n))
    monkeypatch.setattr(workers, "serve_workers", lambda cfg, factory: seen.append("workers"))
    cfg = make_cfg(tmp_path, {}, limits={"backend": "redis"}, http={"max_client_connections": 700})
    server.serve(cfg.model_copy(update={"workers": 2}))
    assert seen == [700, "workers"]


# ---- 9, 10: Redis restarts and outages --------------------------------------------------------
class RedisProcess:
    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir = port, workdir

    def __enter__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def test_a_redis_restart_fails_no_request(tmp_path):
    port = free_port()
    limits = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0", "redis_timeout_s": 0.5}
    with ScriptedUpstream(["ok"], model="raw") as up:
        with RedisProcess(port, tmp_path) as _r1:
            gw = GatewayServer(make_cfg(tmp_path, {"raw": up.base_url}, key={"requests_per_minute": 1000},
                                        limits=limits))
            gw.__enter__()
            with ThreadPoolExecutorish(8) as run:
                assert run(lambda: post(gw, CHAT).status_code) == [200] * 8  # 8 pooled connections
        try:
            with RedisProcess(port, tmp_path):
                assert [post(gw, CHAT).status_code for _ in range(8)] == [200] * 8
        finally:
            gw.__exit__()


class ThreadPoolExecutorish:
    def __init__(self, n):
        from concurrent.futures import ThreadPoolExecutor
        self.n, self.pool = n, ThreadPoolExecutor(n)

    def __enter__(self):
        return lambda fn: list(self.pool.map(lambda _: fn(), range(self.n)))

    def __exit__(self, *exc):
        self.pool.shutdown()


async def _noop():
    pass


def test_a_redis_outage_fails_ready_and_spares_keys_without_limits(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with ScriptedUpstream(["ok"], model="raw") as up:
        gw = GatewayServer(make_cfg(tmp_path, {"raw": up.base_url},
                                    limits={"backend": "redis", "redis_url": dead, "redis_timeout_s": 0.2}))
        gw.app.store.start = _noop  # Redis goes away after a good start
        with gw:
            assert post(gw, CHAT).status_code == 200  # no limits on this key: no bucket to check
            ready = httpx.get(gw.base_url[:-3] + "/ready", timeout=5)
            assert ready.status_code == 503 and "limits store" in ready.json()["reason"]
