"""Audit log: one row per gateway request in SQLite (WAL), written off the event loop.

The event loop only puts a tuple on a queue (no I/O, no lock held across an await); one writer
thread drains it in batches of up to ``batch_size`` rows per transaction, so a burst of 1,000
requests costs a few commits and loses none. A batch waits ``batch_wait_s`` for more rows after
its first (group commit): under steady load a commit (and its fsync) serves every row of that
window instead of one or two. ``close()`` drains the queue before returning.

The writer never dies on a bad row or a failing disk. A batch the database refuses as data (a
number SQLite cannot hold, a string that is not UTF-8) is written row by row, each bad row
once more with its values sanitized, and dropped (counted) only if that fails too. A batch the
database cannot take at all (read-only file, full disk, locked, I/O error) stays in memory and is
retried, up to ``max_pending_rows``; only beyond that are the oldest rows dropped. Meanwhile
``ok`` is false, which fails the gateway's ``/ready`` and, with ``fail_closed``, refuses requests.
At start the database is opened, written once and the free disk space checked, so a read-only
file or a full disk stops the gateway with a clear message instead of losing rows later.

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
import queue
import secrets
import shutil
import sqlite3
import sys
import threading
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
_STOP = object()
# Free disk space (for /ready and min_free_mb) is read at most this often, not after every batch:
# at ~1,000 requests/s a batch is a row or two, and resolving the path and statvfs were syscalls per row.
_DISK_CHECK_S = 1.0
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


class AuditLog:
    def __init__(self, cfg: AuditConfig):
        self.cfg = cfg
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.written = 0
        self.dropped = 0  # rows lost: unwritable data, or past max_pending_rows (logged)
        self.pending = 0  # rows of failed batches held for a retry
        self.failing: str | None = None  # the last write error, until a write succeeds
        self.free_bytes = None
        self.secret = load_secret(cfg) if cfg.prompt == "hash" else None
        self._hmac = hmac.new(self.secret, digestmod="sha256") if self.secret else None
        check(cfg)  # fail at start, not later
        self._disk = Path(cfg.path).resolve()
        self.free_bytes = disk_free(self._disk)
        self._disk_checked = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gateway-audit", daemon=True)
        self._thread.start()

    def record(self, row: tuple) -> None:
        """Queue one row (values in COLUMNS order). Never blocks."""
        self.queue.put(row)

    def prompt_value(self, text: str | None) -> str | None:
        if self._hmac is not None and text is not None:  # prompt: hash
            # the keyed state is made once: 1.1 us a prompt against 1.7 (hmac.digest) and 2.2 us
            # (hmac.new), one run on an idle core
            h = self._hmac.copy()
            h.update(text.encode("utf-8", "replace"))
            return "hmac-sha256:" + h.hexdigest()
        return prompt_field(text, self.cfg.prompt, self.secret)

    @property
    def backlog(self) -> int:
        return self.queue.qsize() + self.pending

    def problem(self) -> str | None:
        """Why rows are not being written now (None: they are)."""
        if not self._thread.is_alive():
            return "audit writer stopped"
        if self.failing:
            return f"audit writes failing: {self.failing}"
        if self.free_bytes is not None and self.free_bytes < self.cfg.min_free_mb * 2 ** 20:
            return f"audit disk has {self.free_bytes / 2 ** 20:.0f} MB free, below audit.min_free_mb"
        if self.backlog > self.cfg.max_pending_rows:
            return f"audit backlog of {self.backlog} rows"
        return None

    @property
    def ok(self) -> bool:
        return self.problem() is None

    # ---- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        conn, held, stop, last_try = None, [], False, 0.0
        while not stop:
            try:  # with rows held after a failure, wake up to retry them even if no row comes
                batch = [self.queue.get(timeout=self.cfg.retry_s) if held else self.queue.get()]
            except queue.Empty:
                batch = []
            wait = self.cfg.batch_wait_s
            if wait and batch and batch[0] is not _STOP and self.queue.qsize() < self.cfg.batch_size:
                time.sleep(wait)  # group commit: the rows of the next few ms share one transaction
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
            rows = held + batch
            if not rows or (held and not stop and time.monotonic() - last_try < self.cfg.retry_s):
                held = rows  # do not hammer a failing disk on every request
                self.pending = len(held)
                continue
            last_try = time.monotonic()
            try:
                if conn is None:
                    conn = connect(self.cfg.path, self.cfg.journal_mode, self.cfg.synchronous)
                self._write(conn, rows)
                held, self.failing = [], None
            except Exception as err:  # the database, not the data: keep the rows, retry later
                self.failing = f"{type(err).__name__}: {err}"
                log.error("audit write failed (%s); %d rows held for a retry", self.failing, len(rows))
                held = rows
                if conn is not None:
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
                    conn = None
                excess = len(held) - self.cfg.max_pending_rows
                if excess > 0:
                    self.dropped += excess
                    held = held[excess:]
                    log.error("audit: %d rows lost (more than audit.max_pending_rows held)", excess)
                if stop:
                    stop = self._last_tries(held)
            self.pending = len(held)
            if time.monotonic() - self._disk_checked >= _DISK_CHECK_S:
                self._disk_checked = time.monotonic()
                try:
                    self.free_bytes = disk_free(self._disk)
                except OSError:
                    pass
        if conn is not None:
            conn.close()

    def _last_tries(self, held: list) -> bool:
        """At close, a held batch gets a few more tries; then it is counted as lost."""
        for _ in range(3):
            time.sleep(self.cfg.retry_s)
            try:
                conn = connect(self.cfg.path, self.cfg.journal_mode, self.cfg.synchronous)
                try:
                    self._write(conn, held)
                finally:
                    conn.close()
                held.clear()
                return True
            except Exception as err:
                log.error("audit: write at close failed: %s", err)
        self.dropped += len(held)
        log.error("audit: %d rows lost at close", len(held))
        held.clear()
        return True

    def _write(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """One transaction; a batch refused for its data goes in row by row. Raises only for
        what stops every row (a read-only or full database, a lock held for 30 s)."""
        try:
            with conn:
                conn.executemany(_INSERT, rows)
            self.written += len(rows)
            return
        except sqlite3.OperationalError:
            raise
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as err:
            log.warning("audit: a batch of %d rows was refused (%s); writing row by row", len(rows), err)
        written = 0
        with conn:
            for row in rows:
                try:
                    conn.execute(_INSERT, row)
                except sqlite3.OperationalError:
                    raise
                except (sqlite3.Error, ValueError, TypeError, OverflowError):
                    try:
                        conn.execute(_INSERT, sanitize(row))
                    except sqlite3.OperationalError:
                        raise
                    except (sqlite3.Error, ValueError, TypeError, OverflowError) as err:
                        self.dropped += 1
                        log.error("audit: row %r dropped: %s", row[:2], err)
                        continue
                written += 1
        self.written += written

    def close(self, timeout_s: float = 30) -> None:
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout_s)


class AuditCollector:
    """The audit log's health in /metrics (read at scrape time from the writer's counters)."""

    def __init__(self, audit: AuditLog):
        self.audit = audit

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        a, p = self.audit, "workbench_gateway_audit_"
        yield CounterMetricFamily(p + "rows_written", "Audit rows committed", value=a.written)
        yield CounterMetricFamily(p + "rows_dropped", "Audit rows lost (bad data, or past "
                                  "max_pending_rows while the database failed)", value=a.dropped)
        yield GaugeMetricFamily(p + "backlog_rows", "Audit rows queued or held for a retry", value=a.backlog)
        yield GaugeMetricFamily(p + "up", "1 while audit rows are being written (0 fails /ready)",
                                value=float(a.ok))
        if a.free_bytes is not None:
            yield GaugeMetricFamily(p + "disk_free_bytes", "Free space on the audit database's disk",
                                    value=a.free_bytes)


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
