"""The audit database's file: its schema, how it is opened, checked at start, pruned and exported,
what a row may hold (``sanitize``) and how a prompt is stored (``prompt_field``). The writer
thread that fills it is workbench/gateway/audit.py.

Files are created 0600 (SQLite gives its -wal and -shm files the same mode). With
``prompt: hash`` the prompt is stored as an HMAC-SHA-256 under a secret from ``hash_secret_env``
or ``hash_secret_file`` (created, 0600, on first start), so a short prompt cannot be found by
hashing a dictionary without the secret.

    workbench gateway prune                          # delete rows older than audit.retention_days
    workbench gateway export-audit --out audit.jsonl # JSONL for Loki / Vector / Fluent Bit
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from workbench.gateway.config import AuditConfig, GatewayConfigError

log = logging.getLogger(__name__)

COLUMNS = ("ts", "request_id", "key_id", "route", "model", "status", "prompt_tokens",
           "completion_tokens", "latency_ms", "ttft_ms", "stream", "moderation", "filter",
           "prompt", "error", "client")
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,              -- unix seconds, request arrival
    request_id TEXT, key_id TEXT, route TEXT, model TEXT, status INTEGER,
    prompt_tokens INTEGER,         -- from the upstream's usage; NULL when it sent none
    completion_tokens INTEGER,     -- usage, or the text events relayed (a dropped stream)
    latency_ms REAL, ttft_ms REAL, stream INTEGER,
    moderation TEXT,               -- verdicts, e.g. "input:ok output:flagged:S1"
    filter TEXT,                   -- e.g. "prompt:block" / "output:mask:2"
    prompt TEXT,                   -- text, "hmac-sha256:<hex>", or NULL (audit.prompt)
    error TEXT,
    client TEXT                    -- the client's address (the proxy's, behind one)
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""
_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_INT64 = 2 ** 63


class AuditError(GatewayConfigError):
    """The audit database cannot be written at start (read-only, no space, bad path)."""


def _private(path: Path) -> None:
    """Create ``path`` 0600 if absent; tighten an existing file of ours to 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if not path.exists() else None
    if fd is not None:
        os.close(fd)
    st = path.stat()
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, 0o600)


def connect(path: str | Path, journal_mode: str = "wal", synchronous: str = "full") -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _private(path)
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(SCHEMA)
    have = {r[1] for r in conn.execute("PRAGMA table_info(audit)")}
    for col in COLUMNS:
        if col not in have:  # a database from an older gateway
            with conn:
                conn.execute(f"ALTER TABLE audit ADD COLUMN {col}")
    return conn


def disk_free(path: str | Path) -> int:
    return shutil.disk_usage(Path(path).parent).free


def check(cfg: AuditConfig) -> None:
    """Open the database and commit one write; raises AuditError naming what is wrong."""
    try:
        Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
        free = disk_free(Path(cfg.path).resolve())
    except OSError as err:
        raise AuditError(f"audit: cannot use the directory of {cfg.path}: {err}") from None
    if free < cfg.min_free_mb * 2 ** 20:
        raise AuditError(f"audit: {free / 2 ** 20:.0f} MB free on the disk of {cfg.path}, below "
                         f"audit.min_free_mb ({cfg.min_free_mb:g}); free space or move audit.path")
    try:
        conn = connect(cfg.path, cfg.journal_mode, cfg.synchronous)
        try:
            with conn:  # a real write: a read-only file fails here, not on the first request
                v = conn.execute("PRAGMA user_version").fetchone()[0]
                conn.execute(f"PRAGMA user_version = {int(v)}")
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as err:
        raise AuditError(f"audit: cannot write {cfg.path}: {err} (check audit.path, its "
                         f"permissions and free space)") from None


def load_secret(cfg: AuditConfig) -> bytes:
    """The HMAC key for ``prompt: hash``: $hash_secret_env if set, else hash_secret_file
    (default: next to the database), created with 256 random bits on first use."""
    if cfg.hash_secret_env and os.environ.get(cfg.hash_secret_env):
        secret = os.environ[cfg.hash_secret_env].encode()
        source = f"${cfg.hash_secret_env}"
    else:
        path = Path(cfg.secret_file)
        source = str(path)
        if not path.exists():
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32) + "\n")
                os.link(tmp, path)  # atomic, and never over a secret another worker just made
                log.info("audit: created the prompt-hash secret %s", path)
            except FileExistsError:
                pass
            except OSError as err:
                raise AuditError(f"audit: cannot create the prompt-hash secret {path}: {err}") from None
            finally:
                tmp.unlink(missing_ok=True)
        secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise AuditError(f"audit: the prompt-hash secret in {source} is shorter than 16 bytes")
    return secret


def prompt_field(text: str | None, policy: str, secret: bytes | None = None) -> str | None:
    if text is None or policy == "omit":
        return None
    if policy == "hash":
        if not secret:
            raise ValueError("prompt: hash needs a secret (load_secret)")
        return "hmac-sha256:" + hmac.new(secret, text.encode("utf-8", "replace"), "sha256").hexdigest()
    return text


def sanitize(row: tuple) -> tuple:
    """Values SQLite takes: integers within 64 bits, finite floats, UTF-8 text; else NULL / text."""
    out = []
    for v in row:
        if v is None or type(v) is float and math.isfinite(v):
            out.append(v)
        elif type(v) is int or type(v) is bool:
            out.append(int(v) if -_INT64 <= v < _INT64 else None)
        elif type(v) is str:
            out.append(v.encode("utf-8", "replace").decode("utf-8"))
        elif isinstance(v, float):
            out.append(None)
        else:
            out.append(str(v)[:1000].encode("utf-8", "replace").decode("utf-8"))
    return tuple(out)


def prune(cfg: AuditConfig, now: float | None = None) -> int:
    """Delete rows older than ``retention_days``; returns how many went."""
    cutoff = (now or time.time()) - cfg.retention_days * 86400
    conn = connect(cfg.path, cfg.journal_mode, cfg.synchronous)
    try:
        with conn:
            n = conn.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n
    finally:
        conn.close()


def export_jsonl(cfg: AuditConfig, out=None, since: float | None = None) -> int:
    """Write rows (oldest first, ``ts >= since``) as one JSON object per line; returns the count.
    Each line carries ``time`` in RFC 3339 so log shippers can use it as the entry's timestamp."""
    out = out or sys.stdout
    conn = connect(cfg.path, cfg.journal_mode, cfg.synchronous)
    n = 0
    try:
        cur = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE ts >= ? ORDER BY ts, id",
                           (since or 0,))
        for row in cur:
            rec = dict(zip(COLUMNS, row))
            rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec["ts"])) + \
                f".{int(rec['ts'] % 1 * 1e6):06d}Z"
            rec["stream"] = bool(rec["stream"])
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    finally:
        conn.close()
    return n
