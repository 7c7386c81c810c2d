"""Audit log: one row per gateway request in SQLite (WAL), written off the event loop.

The event loop only puts a tuple on a queue (no I/O, no lock held across an await); one writer
thread drains it in batches of up to ``batch_size`` rows per transaction, so a burst of 1,000
requests costs a few commits and loses none. ``close()`` drains the queue before returning.

    workbench gateway prune                          # delete rows older than audit.retention_days
    workbench gateway export-audit --out audit.jsonl # JSONL for Loki / Vector / Fluent Bit
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path

from workbench.gateway.config import AuditConfig

log = logging.getLogger(__name__)

COLUMNS = ("ts", "request_id", "key_id", "route", "model", "status", "prompt_tokens",
           "completion_tokens", "latency_ms", "ttft_ms", "stream", "moderation", "filter",
           "prompt", "error")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,              -- unix seconds, request arrival
    request_id TEXT, key_id TEXT, route TEXT, model TEXT, status INTEGER,
    prompt_tokens INTEGER, completion_tokens INTEGER,
    latency_ms REAL, ttft_ms REAL, stream INTEGER,
    moderation TEXT,               -- verdicts, e.g. "input:ok output:flagged:S1"
    filter TEXT,                   -- e.g. "prompt:block" / "output:mask:2"
    prompt TEXT,                   -- text, "sha256:<hex>", or NULL (audit.prompt)
    error TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""
_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_STOP = object()


def connect(path: str | Path, journal_mode: str = "wal", synchronous: str = "full") -> sqlite3.Connection:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(SCHEMA)
    return conn


def prompt_field(text: str | None, policy: str) -> str | None:
    if text is None or policy == "omit":
        return None
    if policy == "hash":
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


class AuditLog:
    def __init__(self, cfg: AuditConfig):
        self.cfg = cfg
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.written = 0
        self.dropped = 0  # rows lost to a failing database (logged)
        connect(cfg.path, cfg.journal_mode, cfg.synchronous).close()  # fail at start, not later
        self._thread = threading.Thread(target=self._run, name="gateway-audit", daemon=True)
        self._thread.start()

    def record(self, row: tuple) -> None:
        """Queue one row (values in COLUMNS order). Never blocks."""
        self.queue.put(row)

    def _run(self) -> None:
        conn = connect(self.cfg.path, self.cfg.journal_mode, self.cfg.synchronous)
        stop = False
        while not stop:
            batch = [self.queue.get()]
            while len(batch) < self.cfg.batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [r for r in batch if r is not _STOP]
                while True:  # rows queued after the stop marker still go in
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
            if batch:
                self._write(conn, batch)
        conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[tuple]) -> None:
        for attempt in range(3):
            try:
                with conn:
                    conn.executemany(_INSERT, batch)
                self.written += len(batch)
                return
            except sqlite3.OperationalError as err:  # e.g. "database is locked" by prune
                log.warning("audit write failed (%s), attempt %d", err, attempt + 1)
                time.sleep(0.5 * (attempt + 1))
        self.dropped += len(batch)
        log.error("audit: %d rows lost after retries", len(batch))

    def close(self, timeout_s: float = 30) -> None:
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout_s)


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
