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

The database's file (its schema, 0600 files, the prompt-hash secret, ``prune`` and
``export-audit``) is workbench/gateway/auditdb.py.
"""

from __future__ import annotations

import hmac
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from workbench.gateway.auditdb import _INSERT, check, connect, disk_free, load_secret, prompt_field, sanitize
from workbench.gateway.config import AuditConfig

log = logging.getLogger(__name__)

_STOP = object()
# Free disk space (for /ready and min_free_mb) is read at most this often, not after every batch:
# at ~1,000 requests/s a batch is a row or two, and resolving the path and statvfs were syscalls per row.
_DISK_CHECK_S = 1.0


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
