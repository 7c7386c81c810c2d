"""One step: one arm at one load point, its requests sent, its probes read, its raw records kept.

The executor (executor.py) calls ``measure_step`` for every step the plan asks for. A step's
requests and send offsets come from a generator seeded by (seed, point index, repeat), so every
arm measured at one (point, repeat) is sent the same prompts at the same offsets. An open-loop
step sends at its offsets whatever the server does; a concurrency step (closed loop) sends every
request at once behind a cap of ``concurrency`` in flight, so each reply releases the next send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from workbench.config import LoadtestConfig
from workbench.loadgen import arrivals, workloads
from workbench.loadgen.client import Record, run_step
from workbench.loadgen.metrics import errors_by_kind, step_metrics
from workbench.loadgen.probes import StepProbe, limiting_factor
from workbench.loadgen.procs import run_step_processes
from workbench.loadtest.arms import Arm
from workbench.loadtest.plan import Point

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    rate: float  # offered req/s (inf: a concurrency step)
    label: str
    records: list[Record]
    metrics: dict[str, float]  # client metrics + server / utilization probes, flat
    errors: dict[str, int] = field(default_factory=dict)
    limited_by: str = ""  # probes.limiting_factor: client | server front-end | engine | gpu | none
    started_unix: float = 0.0
    concurrency: int | None = None  # a closed-loop step's requests in flight
    steady_state: dict | None = None  # steady.steady_state(...) of its measured records, as JSON

    @property
    def steady_reached(self) -> bool | None:
        """True: reached steady state; False: shown not to (backlog grew); None: too short to tell
        (or not judged)."""
        return None if self.steady_state is None else self.steady_state.get("reached")


def step_requests(cfg: LoadtestConfig, specs: list[workloads.RequestSpec], index: int,
                  rate: float, repeat: int = 0) -> tuple[list[workloads.RequestSpec], np.ndarray]:
    """The step's requests and their send offsets, from a generator seeded by (seed, step, repeat):
    every variant compared at one (rate, repeat) gets the same prompts at the same offsets."""
    rng = np.random.default_rng([cfg.seed, index, repeat])
    if cfg.duration_s is not None and np.isfinite(rate):
        measured = arrivals.schedule(cfg.arrival, rate, rng, duration_s=cfg.duration_s,
                                     burstiness=cfg.burstiness)
        if cfg.warmup_requests:  # warm-up arrivals come first, at the same rate
            warm = arrivals.schedule(cfg.arrival, rate, rng, n=cfg.warmup_requests + 1,
                                     burstiness=cfg.burstiness)
            offsets = np.concatenate([warm[:-1], warm[-1] + measured])
        else:
            offsets = measured
    else:
        offsets = arrivals.schedule(cfg.arrival, rate, rng, n=cfg.requests_per_step + cfg.warmup_requests,
                                    burstiness=cfg.burstiness)
    return workloads.sample(specs, len(offsets), rng), offsets


async def measure_step(cfg: LoadtestConfig, arm: Arm, session, specs: list[workloads.RequestSpec],
                       point: Point, index: int, repeat: int = 0, label: str | None = None) -> StepResult:
    """One step of ``arm`` at ``point``: its requests, probes and flat metrics."""
    label = label or point.label
    rate, cap = point.rate, point.concurrency or cfg.max_concurrency
    reqs, offsets = step_requests(cfg, specs, index, rate, repeat)
    log.info("%s step %s (repeat %d): %d requests (%d warm-up), %s", arm.variant, label, repeat, len(reqs),
             min(cfg.warmup_requests, len(reqs)), f"closed loop at {point.concurrency} in flight"
             if point.concurrency else f"{cfg.arrival} arrivals over {float(offsets[-1]):.1f} s")
    headers = {"Authorization": f"Bearer {arm.target.api_key}"} if arm.target.api_key else None
    probe = StepProbe(arm.root_url if cfg.scrape_metrics else None, cfg.sample_interval_s, headers,
                      server_pid=arm.server_pid)
    await asyncio.to_thread(probe.start)  # the before-scrape, outside the timed window
    started = time.time()
    try:
        if cfg.client_processes > 1:
            records = await asyncio.to_thread(
                run_step_processes, arm.target, reqs, offsets.tolist(), label, cfg.warmup_requests,
                cap, cfg.client_processes, cfg.timeout_s)
        else:
            records = await run_step(session, arm.target, reqs, offsets.tolist(), label,
                                     cfg.warmup_requests, cap)
    finally:
        probed = await asyncio.to_thread(probe.stop)
    result = StepResult(rate, label, records, {**step_metrics(records, rate, cfg.slo), **probed},
                        errors_by_kind([r for r in records if not r.warmup]), started_unix=started,
                        concurrency=point.concurrency)
    m = result.metrics
    if point.concurrency:  # closed loop: a send waits for a free slot by design, not a late client
        for key in [k for k in m if k.startswith("send_lag_ms")]:
            m[key.replace("send_lag", "slot_wait")] = m.pop(key)
    result.limited_by = limiting_factor(m, cfg.slo.min_goodput)
    log.info("%s step %s: achieved %.2f req/s, TTFT p50 %.0f ms p99 %.0f ms, E2EL p99 %.0f ms, "
             "goodput %.0f%%, errors %s, limited by %s", arm.variant, label,
             m.get("achieved_req_per_s", float("nan")), m.get("ttft_ms_p50", float("nan")),
             m.get("ttft_ms_p99", float("nan")), m.get("e2el_ms_p99", float("nan")),
             100 * m.get("goodput_fraction", 0.0), result.errors or "none", result.limited_by)
    return result
