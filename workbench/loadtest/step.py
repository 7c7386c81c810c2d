"""One step: one arm at one load point, its requests sent, its probes read, its raw records kept,
and whether it reached steady state (workbench/loadgen/steady.py).

The executor (executor.py) calls ``measure_step`` for every step the plan asks for. A step's
requests and send offsets come from a generator seeded by (seed, point index, repeat), so every
arm measured at one (point, repeat) is sent the same prompts at the same offsets. An open-loop
step sends at its offsets whatever the server does; a concurrency step (closed loop) sends every
request at once behind a cap of ``concurrency`` in flight, so each reply releases the next send.

Sizing (``loadtest.window``). ``latency`` (open loop, one client process): the schedule runs long
enough for the longest warm-up and window, and ``LatencyWindow`` decides while the step runs: the
warm-up ends once ``warmup_requests`` (at least one) have been answered and ``warmup_factor`` x
their E2E p50 has passed (``steady.warmup_s``); the measured window is then ``steady.measure_window_s``
of that p50 (``window_factor`` x p50, ``min_requests`` arrivals, within [min_window_s, max_window_s]),
lengthened while the window's own requests live longer (a queue building). Arrivals after it are
never sent. Several client processes: sized before the step from the arm's previous E2E p50.
``schedule``: ``requests_per_step`` or ``duration_s`` as fixed before the step. Either way ``steady.steady_state`` judges the measured records.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from workbench.config import LoadtestConfig
from workbench.loadgen import arrivals, workloads
from workbench.loadgen import steady
from workbench.loadgen.client import Record, run_step
from workbench.loadgen.metrics import errors_by_kind, step_metrics
from workbench.loadgen.limits import limiting_factor
from workbench.loadgen.probes import StepProbe
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
    limited_by: str = ""  # limits.limiting_factor: "name: evidence" (admission cap, KV cache, host CPU, ...)
    started_unix: float = 0.0
    concurrency: int | None = None  # a closed-loop step's requests in flight
    steady_state: dict | None = None  # steady.steady_state(...) of its measured records, as JSON

    @property
    def steady_reached(self) -> bool | None:
        """True: reached steady state; False: shown not to (a backlog grew: not sustainable); None:
        too short to tell, or not judged (``steady_verdict``)."""
        verdict = (self.steady_state or {}).get("verdict")
        return {"steady": True, "not sustainable": False}.get(verdict)


def steady_verdict(judged: "steady.SteadyState", cfg) -> str:
    """steady | not sustainable | too short to tell. The detector answers reached or not; here
    "not reached" is split (issue 27: a growing backlog is a fail, a step too short to tell is
    re-measured or undecided). Not sustainable needs the queue itself, counted: arrivals in the
    window minus departures (flow conservation: the rise in flight) over 3 requests AND over
    2 x ``completion_tolerance`` of the arrivals, or over 3 with the in-flight trend test also
    significant. A trend alone is not enough: on a window of a few lifetimes the HAC test called
    a rise of two requests a backlog at 20 req/s against a fake server far from its capacity
    (tests/test_report.py), and a fail there makes a variant ineligible. Anything else not reached
    (too few arrivals, a window under ``min_window_lifetimes`` lifetimes, a small deficit) is too
    short to tell: never a pass, never a fail."""
    if judged.reached:
        return "steady"
    deficit = judged.arrivals - judged.departures
    p, slope = judged.inflight_slope_p, judged.inflight_slope_per_s
    growing = p is not None and slope is not None and p < cfg.trend_alpha and \
        slope * judged.window_s >= max(1.0, cfg.completion_tolerance * (judged.inflight_mean or 0.0))
    if deficit > 3 and (growing or deficit > 2 * cfg.completion_tolerance * judged.arrivals):
        return "not sustainable"
    return "too short to tell"


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


CLOSED_LOOP_ROUNDS = 4  # measured requests of a closed-loop step: at least 4 x its concurrency


class LatencyWindow:
    """Where a step's warm-up and measurement end, decided from the latency seen as it runs."""

    POLL_S = 0.05  # how often the answered requests are looked at

    def __init__(self, cfg: LoadtestConfig, rate: float):
        self.cfg, self.rate = cfg, rate
        self.e2el_p50_s: float | None = None  # observed in the warm-up
        self.warmup_end_s = self.end_s = math.inf

    async def watch(self, records: list[Record], clock) -> tuple[float, float]:
        sc = self.cfg.steady_state
        need = max(1, self.cfg.warmup_requests)
        while True:
            t = clock()
            lives = [r.end_s - r.send_s for r in records if r.end_s is not None and r.send_s is not None]
            if len(lives) >= need:
                p50 = float(np.median(lives))
                if t >= steady.warmup_s(p50, sc):
                    self.e2el_p50_s = p50
                    break
            if t >= sc.max_window_s:  # nothing (or too little) answered: the longest window
                self.e2el_p50_s = float(np.median(lives)) if lives else None
                break
            await asyncio.sleep(self.POLL_S)
        self.warmup_end_s = warm = t
        self.end_s = warm + steady.measure_window_s(self.e2el_p50_s or math.inf, sc, self.rate)
        # Run until the window holds window_factor lifetimes of what it measures: while a queue
        # builds, requests live longer than in the warm-up, so the window grows with the median
        # lifetime of its own arrivals (one still in flight counts its age so far: a lower bound),
        # up to max_window_s. A backlog that outgrows even that is judged so (steady_verdict).
        # The window also stays open until min_requests measured arrivals have been sent: sized
        # from the rate it expects that many, but Poisson arrivals fall short about half the time,
        # and steady.steady_state judges the count that came (3 of an expected 8 was seen).
        last = warm + sc.max_window_s
        while (t := clock()) < self.end_s or (t < last and sum(
                1 for r in records if r.send_s is not None and r.scheduled_s >= warm) < sc.min_requests):
            lives = [(r.end_s if r.end_s is not None else t) - r.send_s for r in records
                     if r.send_s is not None and r.scheduled_s >= warm]
            if lives:
                p50 = float(np.median(lives))
                self.end_s = min(last, max(self.end_s, warm + steady.measure_window_s(p50, sc, self.rate)))
            await asyncio.sleep(self.POLL_S)
        self.end_s = max(self.end_s, min(t, last))  # held open for min_requests: it ends now
        return self.warmup_end_s, self.end_s


def latency_sized(cfg: LoadtestConfig, point: Point) -> bool:
    """Whether this step's warm-up and window come from observed latency (``loadtest.window``)."""
    return cfg.window == "latency" and point.concurrency is None and cfg.client_processes == 1 \
        and math.isfinite(point.rate)


def latency_schedule(cfg: LoadtestConfig, specs: list[workloads.RequestSpec], index: int, rate: float,
                     repeat: int) -> tuple[list[workloads.RequestSpec], np.ndarray]:
    """Arrivals for the longest warm-up and window (2 x max_window_s); the window cuts them short."""
    rng = np.random.default_rng([cfg.seed, index, repeat])
    offsets = arrivals.schedule(cfg.arrival, rate, rng, duration_s=2 * cfg.steady_state.max_window_s,
                                burstiness=cfg.burstiness)
    return workloads.sample(specs, len(offsets), rng), offsets


def pilot_schedule(cfg: LoadtestConfig, specs: list[workloads.RequestSpec], index: int, rate: float,
                   repeat: int, e2el_p50_s: float) -> tuple[list[workloads.RequestSpec], np.ndarray, int, float]:
    """Several client processes cannot share a window decided while the step runs: their schedule
    is sized before it from the arm's E2E p50 in its previous step (``e2el_p50_s``): arrivals for
    ``steady.warmup_s`` (warm-up), then ``steady.measure_window_s``. (requests, offsets, warm-up
    count, warm-up seconds)."""
    sc = cfg.steady_state
    warm, win = steady.warmup_s(e2el_p50_s, sc), steady.measure_window_s(e2el_p50_s, sc, rate)
    rng = np.random.default_rng([cfg.seed, index, repeat])
    offsets = arrivals.schedule(cfg.arrival, rate, rng, duration_s=warm + win, burstiness=cfg.burstiness)
    return workloads.sample(specs, len(offsets), rng), offsets, int(np.searchsorted(offsets, warm)), warm


async def measure_step(cfg: LoadtestConfig, arm: Arm, session, specs: list[workloads.RequestSpec],
                       point: Point, index: int, repeat: int = 0, label: str | None = None,
                       prior_e2el_p50_s: float | None = None) -> StepResult:
    """One step of ``arm`` at ``point``: its requests, probes and flat metrics. ``prior_e2el_p50_s``:
    the arm's E2E p50 in its previous step, which sizes a multi-process step (``pilot_schedule``)."""
    label = label or point.label
    rate, cap = point.rate, point.concurrency or cfg.max_concurrency
    window = LatencyWindow(cfg, rate) if latency_sized(cfg, point) else None
    warmup, pilot = cfg.warmup_requests, None
    if window is None and cfg.window == "latency" and point.concurrency is None and math.isfinite(rate) \
            and prior_e2el_p50_s:
        reqs, offsets, warmup, pilot = pilot_schedule(cfg, specs, index, rate, repeat, prior_e2el_p50_s)
        log.info("%s step %s (repeat %d): %d requests (%d warm-up), sized from its previous E2E p50 %.2f s",
                 arm.variant, label, repeat, len(reqs), warmup, prior_e2el_p50_s)
    elif window is not None:
        reqs, offsets = latency_schedule(cfg, specs, index, rate, repeat)
        log.info("%s step %s (repeat %d): %s arrivals at %g req/s, warm-up and window sized from the latency "
                 "seen (at most %.0f s)", arm.variant, label, repeat, cfg.arrival, rate, float(offsets[-1]))
    else:
        if point.concurrency:  # closed loop: the first `concurrency` replies fill the batch (warm-up),
            # then CLOSED_LOOP_ROUNDS batches' worth measured, so that the batch stays full
            warmup = max(cfg.warmup_requests, point.concurrency)
            cfg = cfg.model_copy(update={"warmup_requests": warmup, "requests_per_step": max(
                cfg.requests_per_step, cfg.steady_state.min_requests, CLOSED_LOOP_ROUNDS * point.concurrency)})
        reqs, offsets = step_requests(cfg, specs, index, rate, repeat)
        log.info("%s step %s (repeat %d): %d requests (%d warm-up), %s", arm.variant, label, repeat, len(reqs),
                 min(cfg.warmup_requests, len(reqs)), f"closed loop at {point.concurrency} in flight"
                 if point.concurrency else f"{cfg.arrival} arrivals over {float(offsets[-1]):.1f} s")
    headers = {"Authorization": f"Bearer {arm.target.api_key}"} if arm.target.api_key else None
    probe = StepProbe(arm.root_url if cfg.scrape_metrics else None, cfg.sample_interval_s, headers,
                      server_pid=arm.server_pid, max_num_seqs=arm.max_num_seqs)
    await asyncio.to_thread(probe.start)  # the before-scrape, outside the timed window
    started = time.time()
    try:
        if cfg.client_processes > 1:
            records = await asyncio.to_thread(
                run_step_processes, arm.target, reqs, offsets.tolist(), label, warmup,
                cap, cfg.client_processes, cfg.timeout_s)
        else:
            records = await run_step(session, arm.target, reqs, offsets.tolist(), label,
                                     warmup, cap, window)
    finally:
        probed = await asyncio.to_thread(probe.stop)
    result = StepResult(rate, label, records, {**step_metrics(records, rate, cfg.slo), **probed},
                        errors_by_kind([r for r in records if not r.warmup]), started_unix=started,
                        concurrency=point.concurrency)
    judged = steady.steady_state(records, None if point.concurrency else rate, cfg.steady_state)
    result.steady_state = {**judged.model_dump(mode="json"),
                           "warmup_e2el_p50_s": window.e2el_p50_s if window else prior_e2el_p50_s if pilot else None,
                           "warmup_s": window.warmup_end_s if window else pilot,
                           "sized_by": "latency" if window else "previous step's latency" if pilot else "schedule"}
    result.steady_state["verdict"] = steady_verdict(judged, cfg.steady_state)
    m = result.metrics
    m["steady_state_reached"] = float(judged.reached)
    if point.concurrency:  # closed loop: a send waits for a free slot by design, not a late client
        for key in [k for k in m if k.startswith("send_lag_ms")]:
            m[key.replace("send_lag", "slot_wait")] = m.pop(key)
    result.limited_by = limiting_factor(m, cfg.slo.min_goodput, steady=judged,
                                        closed_loop=point.concurrency is not None)
    log.info("%s step %s: achieved %.2f req/s, TTFT p50 %.0f ms p99 %.0f ms, E2EL p99 %.0f ms, "
             "goodput %.0f%%, errors %s, limited by %s; %s", arm.variant, label,
             m.get("achieved_req_per_s", float("nan")), m.get("ttft_ms_p50", float("nan")),
             m.get("ttft_ms_p99", float("nan")), m.get("e2el_ms_p99", float("nan")),
             100 * m.get("goodput_fraction", 0.0), result.errors or "none", result.limited_by, judged.reason)
    return result
