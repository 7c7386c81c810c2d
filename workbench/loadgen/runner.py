"""A sweep of open-loop steps, one per offered rate: the load generator's whole run.

Shared by the ``loadtest`` stage and the one-step CLI (``python -m workbench.loadgen``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from workbench.config import LoadtestConfig
from workbench.loadgen import arrivals, workloads
from workbench.loadgen.client import Record, Target, make_session, run_step, step_label
from workbench.loadgen.metrics import errors_by_kind, step_metrics
from workbench.loadgen.probes import StepProbe, limiting_factor
from workbench.loadgen.procs import run_step_processes

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    rate: float
    label: str
    records: list[Record]
    metrics: dict[str, float]  # client metrics + server / utilization probes, flat
    errors: dict[str, int] = field(default_factory=dict)
    limited_by: str = ""  # probes.limiting_factor: client | server front-end | engine | gpu | none
    started_unix: float = 0.0


def step_requests(cfg: LoadtestConfig, specs: list[workloads.RequestSpec], index: int,
                  rate: float, repeat: int = 0) -> tuple[list[workloads.RequestSpec], np.ndarray]:
    """The step's requests and their send offsets, from a generator seeded by (seed, step, repeat):
    every variant compared at one (rate, repeat) gets the same prompts at the same offsets."""
    rng = np.random.default_rng([cfg.seed, index, repeat])
    if cfg.duration_s is not None:
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


@dataclass(frozen=True)
class Arm:
    """One configuration under test: a variant's endpoint (and its server's pid for CPU probes)."""

    variant: str
    target: Target
    root_url: str | None
    server_pid: int | None = None


async def measure_step(cfg: LoadtestConfig, arm: Arm, session, specs: list[workloads.RequestSpec],
                       rate: float, index: int, repeat: int = 0, label: str | None = None) -> StepResult:
    """One open-loop step of ``arm`` at ``rate``: its requests, probes and flat metrics."""
    label = label or step_label(rate)
    reqs, offsets = step_requests(cfg, specs, index, rate, repeat)
    log.info("%s step %s (repeat %d): %d requests (%d warm-up), %s arrivals over %.1f s", arm.variant, label,
             repeat, len(reqs), min(cfg.warmup_requests, len(reqs)), cfg.arrival, float(offsets[-1]))
    headers = {"Authorization": f"Bearer {arm.target.api_key}"} if arm.target.api_key else None
    probe = StepProbe(arm.root_url if cfg.scrape_metrics else None, cfg.sample_interval_s, headers,
                      server_pid=arm.server_pid)
    await asyncio.to_thread(probe.start)  # the before-scrape, outside the timed window
    started = time.time()
    try:
        if cfg.client_processes > 1:
            records = await asyncio.to_thread(
                run_step_processes, arm.target, reqs, offsets.tolist(), label, cfg.warmup_requests,
                cfg.max_concurrency, cfg.client_processes, cfg.timeout_s)
        else:
            records = await run_step(session, arm.target, reqs, offsets.tolist(), label,
                                     cfg.warmup_requests, cfg.max_concurrency)
    finally:
        probed = await asyncio.to_thread(probe.stop)
    result = StepResult(rate, label, records, {**step_metrics(records, rate, cfg.slo), **probed},
                        errors_by_kind([r for r in records if not r.warmup]), started_unix=started)
    m = result.metrics
    result.limited_by = limiting_factor(m, cfg.slo.min_goodput)
    log.info("%s step %s: achieved %.2f req/s, TTFT p50 %.0f ms p99 %.0f ms, E2EL p99 %.0f ms, "
             "goodput %.0f%%, errors %s, limited by %s", arm.variant, label,
             m.get("achieved_req_per_s", float("nan")), m.get("ttft_ms_p50", float("nan")),
             m.get("ttft_ms_p99", float("nan")), m.get("e2el_ms_p99", float("nan")),
             100 * m.get("goodput_fraction", 0.0), result.errors or "none", result.limited_by)
    return result


async def sweep(cfg: LoadtestConfig, target: Target, root_url: str | None,
                on_step: Callable[[StepResult], None] | None = None,
                server_pid: int | None = None) -> list[StepResult]:
    """One step per offered rate against one endpoint (the one-step CLI's run). ``server_pid``:
    the managed server, whose processes' CPU is sampled so each step can say what limited it."""
    specs = workloads.load(cfg.workload, np.random.default_rng(cfg.seed))
    arm = Arm("endpoint", target, root_url, server_pid)
    results = []
    async with make_session(cfg.timeout_s) as session:
        for index, rate in enumerate(cfg.rates):
            result = await measure_step(cfg, arm, session, specs, rate, index)
            results.append(result)
            if on_step:
                on_step(result)
            g = result.metrics.get("goodput_fraction", 0.0)
            if cfg.stop_below_goodput is not None and g < cfg.stop_below_goodput:
                log.info("goodput %.0f%% < %.0f%%: saturated, skipping rates %s", 100 * g,
                         100 * cfg.stop_below_goodput, cfg.rates[index + 1:])
                break
    return results


def run_async(coro):
    """Run a coroutine to completion on uvloop when installed (asyncio otherwise), in a worker
    thread when this thread already runs a loop (a Jupyter kernel does)."""
    try:
        import uvloop

        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop

    def go():
        loop = new_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    box: dict = {}

    def worker():
        try:
            box["value"] = go()
        except BaseException as err:
            box["error"] = err

    t = threading.Thread(target=worker, name="loadgen")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
