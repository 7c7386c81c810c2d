"""Audit log: no row lost under 1,000 concurrent requests, retention pruning, JSONL export, and
the ``workbench gateway`` commands that look after it and the keys."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import yaml

from gateway_helpers import KEY, make_cfg
from workbench.cli import main as workbench
from workbench.gateway.app import Gateway
from workbench.gateway.audit import AuditLog, export_jsonl, prune
from workbench.gateway.config import load_config
from workbench.gateway.keys import KeyStore
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
                    0, None, None, None, None))
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
        for policy, check in (("store", lambda p: p == "secret plan"), ("hash", lambda p: p.startswith("sha256:")),
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
