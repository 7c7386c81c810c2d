"""Upstream pools: one upstream name served by several replicas (vLLM servers of one model).

A request goes to the healthy replica with the fewest outstanding requests (ties: round robin),
which follows the replicas' real speed better than round robin when generations differ in
length (Envoy's LEAST_REQUEST). A replica leaves the pool (is *ejected*) when a connection to it
is refused, when ``unhealthy_after`` active checks in a row fail, or when ``unhealthy_after``
requests in a row fail on it (passive checks, after Envoy's outlier detection: a 5xx, a reply
that cannot be read, a stream that breaks off), and returns after ``healthy_after`` checks in a
row pass, but not before ``eject_s`` x the number of ejections in a row (at most 300 s) has
passed since it left: a replica that answers ``/health`` but fails requests stays out longer
each time (it would otherwise draw traffic every few seconds, least-outstanding routing sending
it *more*, since its failures finish fast). The active check is ``GET <root>/health`` (vLLM's) every
``health_interval_s``, where root is the base URL without its ``/v1``. When every replica is
ejected, all of them are tried again (a pool never refuses on its own: the connect error then
says what is wrong).

Outstanding counts a request from the moment it is sent until its reply is fully relayed (the
gateway calls ``Pool.done`` then), so a long stream keeps its replica busy.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from workbench.gateway.config import UpstreamConfig

log = logging.getLogger(__name__)


class Replica:
    __slots__ = ("url", "root", "outstanding", "healthy", "fails", "passes", "errors", "ejections",
                 "out_until")

    def __init__(self, url: str):
        self.url = url  # base URL, .../v1
        self.root = url[:-3] if url.endswith("/v1") else url
        self.outstanding = 0
        self.healthy = True
        self.fails = self.passes = 0  # consecutive failed / passed active checks
        self.errors = 0  # consecutive failed requests (passive checks)
        self.ejections = 0  # ejections since it last served a request well
        self.out_until = 0.0  # monotonic time before which checks cannot bring it back

    def __repr__(self) -> str:
        return f"Replica({self.url}, outstanding={self.outstanding}, healthy={self.healthy})"


class PoolMetrics:
    """Per-replica gauges, registered in the gateway's own registry."""

    def __init__(self, registry: CollectorRegistry):
        p = "workbench_gateway_upstream_"
        self.healthy = Gauge(p + "replica_healthy", "1 while a pool replica receives requests",
                             ["upstream", "replica"], registry=registry)
        self.outstanding = Gauge(p + "replica_outstanding", "Requests sent to a replica and not finished",
                                   ["upstream", "replica"], registry=registry)
        self.ejections = Counter(p + "replica_ejections", "Times a replica left its pool",
                                 ["upstream", "replica"], registry=registry)


class Pool:
    def __init__(self, name: str, cfg: UpstreamConfig, metrics: PoolMetrics | None = None):
        self.name, self.cfg = name, cfg
        self.replicas = [Replica(u) for u in cfg.urls]
        self.metrics = metrics
        self._next = 0  # round-robin start among equally loaded replicas
        self._task: asyncio.Task | None = None
        if metrics:
            for r in self.replicas:
                metrics.healthy.labels(name, r.url).set(1)

    def __len__(self) -> int:
        return len(self.replicas)

    def pick(self, exclude: Replica | None = None) -> Replica:
        """The healthy replica with the fewest outstanding requests (``exclude``: one just failed)."""
        reps = self.replicas
        if len(reps) == 1:
            return reps[0]
        n = len(reps)
        start = self._next = (self._next + 1) % n
        best = None
        for pass_ in (0, 1):  # 1: no healthy replica is left; try the ejected ones too
            for i in range(n):
                r = reps[(start + i) % n]
                if r is exclude or (pass_ == 0 and not r.healthy):
                    continue
                if best is None or r.outstanding < best.outstanding:
                    best = r
            if best is not None:
                return best
        return exclude or reps[0]

    def begin(self, r: Replica) -> None:
        r.outstanding += 1
        if self.metrics and len(self.replicas) > 1:
            self.metrics.outstanding.labels(self.name, r.url).inc()

    def done(self, r: Replica) -> None:
        r.outstanding -= 1
        if self.metrics and len(self.replicas) > 1:
            self.metrics.outstanding.labels(self.name, r.url).dec()

    def connect_failed(self, r: Replica) -> None:
        """A refused connection: the replica is gone; eject it now, the checks bring it back."""
        if len(self.replicas) > 1:
            self._set(r, False, "connection refused")

    def request_failed(self, r: Replica, why: str) -> None:
        """A request failed on ``r`` (5xx, unreadable reply, broken stream): a passive check."""
        r.errors += 1
        if r.healthy and r.errors >= self.cfg.unhealthy_after and len(self.replicas) > 1:
            self._set(r, False, f"{r.errors} requests in a row failed: {why}")

    def request_ok(self, r: Replica) -> None:
        r.errors = 0
        if r.healthy:
            r.ejections = 0

    def _set(self, r: Replica, healthy: bool, why: str) -> None:
        if r.healthy == healthy:
            return
        if healthy and time.monotonic() < r.out_until:
            return  # still serving its ejection time
        if not healthy:
            r.ejections += 1
            r.out_until = time.monotonic() + min(300.0, self.cfg.eject_s * r.ejections)
        r.healthy, r.fails, r.passes, r.errors = healthy, 0, 0, 0
        if healthy:
            log.warning("upstream %s: replica %s is back (%s)", self.name, r.url, why)
        else:
            log.warning("upstream %s: replica %s ejected (%s)", self.name, r.url, why)
        if self.metrics:
            self.metrics.healthy.labels(self.name, r.url).set(int(healthy))
            if not healthy:
                self.metrics.ejections.labels(self.name, r.url).inc()

    def observe(self, r: Replica, ok: bool, why: str = "") -> None:
        """One active check's outcome."""
        if ok:
            r.fails, r.passes = 0, r.passes + 1
            if not r.healthy and r.passes >= self.cfg.healthy_after:
                self._set(r, True, f"{r.passes} checks passed")
        else:
            r.passes, r.fails = 0, r.fails + 1
            if r.healthy and r.fails >= self.cfg.unhealthy_after:
                self._set(r, False, f"{r.fails} checks failed: {why}")

    # ---- active health checks --------------------------------------------------------------
    def start(self, session: aiohttp.ClientSession, headers: dict) -> None:
        if len(self.replicas) > 1 and self.cfg.health_interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._check_loop(session, headers), name=f"health-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _check(self, session: aiohttp.ClientSession, headers: dict, r: Replica) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)
            async with session.get(r.root + "/health", headers=headers, timeout=timeout) as resp:
                await resp.read()
                self.observe(r, resp.status == 200, f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            self.observe(r, False, type(err).__name__)

    async def _check_loop(self, session: aiohttp.ClientSession, headers: dict) -> None:
        auth = {k: v for k, v in headers.items() if k == "Authorization"}
        while True:
            await asyncio.gather(*(self._check(session, auth, r) for r in self.replicas))
            await asyncio.sleep(self.cfg.health_interval_s)
