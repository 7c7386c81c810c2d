"""Did a load step reach steady state? Pure functions over a step's raw records; no I/O.

A step measures a sustained rate only when the system it drove was in equilibrium over the
measured window: requests left as fast as they came, and the number in flight was not growing.
A step shorter than a request's lifetime measures the ramp instead (issue 27: 6 s GPU steps with
an E2E p50 of 5.6 s grew in-flight requests through every step). Two tests, both needed:

1. **Flow balance.** Over the measured window [first, last measured send], departures (requests
   that ended in the window, whatever their outcome: a failed request has left the system too)
   fall short of arrivals (sends in the window) by at most ``completion_tolerance`` of them plus
   the in-flight count's own noise (1 + 2 sqrt(2 x mean in flight)). By flow
   conservation departures = arrivals - (in-flight at the end - in-flight at the start), so a
   growing backlog shows here. Failures are counted and named in the reason; whether the
   requests were *good* is the SLO's business, not this test's.
2. **No upward trend in flight.** The in-flight count (from every record's send and end times,
   warm-up included: a warm-up request still running occupies the server) is sampled on a
   uniform grid across the window and regressed on time by OLS. Neighbouring samples of a queue
   length are strongly autocorrelated, so the slope's standard error is Newey-West (HAC,
   Bartlett kernel, statsmodels) with a lag window of two request lifetimes (E2E p50): the
   in-flight count forgets its past over about one lifetime (M/G/inf), longer when requests
   queue. The step is not steady when the slope is significantly positive (one-sided,
   ``trend_alpha``) AND the fitted rise over the window is at least one request and at least
   ``completion_tolerance`` of the mean in flight: a statistically clear rise of a tenth of a
   request is no backlog.

Before either test, the window must hold ``min_window_lifetimes`` request lifetimes (E2E p50 of
the requests sent in it) and ``min_requests`` arrivals; otherwise the step is not steady and the
reason says why. Closed-loop steps (fixed concurrency: offered rate None) go through the same
tests; their in-flight count is flat by construction, so they are steady unless requests stall.

Sizing a step so that it can pass: ``warmup_s`` and ``measure_window_s`` from an observed E2E p50.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from workbench.config import SteadyStateConfig
from workbench.loadgen.client import Record

GRID_POINTS = 200  # in-flight samples across the window: fine enough for any window >= 3 lifetimes
TEST = ("OLS of the in-flight count on time over a uniform grid; Newey-West (HAC, Bartlett) "
        "standard error, lag window two E2E p50 lifetimes; one-sided test for a positive slope")


class SteadyState(BaseModel):
    """Whether one step reached steady state, with the numbers that decided it."""

    model_config = ConfigDict(extra="forbid")

    reached: bool
    reason: str
    test: str = TEST
    window_s: float  # the measured window: first to last measured send
    e2el_p50_s: float | None  # request lifetime (end - send) median over the window's arrivals
    offered_req_per_s: float | None  # None: closed loop (fixed concurrency)
    arrivals: int  # sends in the window (warm-up excluded by construction: they precede it)
    departures: int  # ends in the window, any outcome
    failed: int  # of those departures, failed requests
    arrival_req_per_s: float
    completion_req_per_s: float  # successful ends in the window / window
    departure_over_arrival: float | None  # the flow-balance ratio
    inflight_mean: float | None
    inflight_slope_per_s: float | None
    inflight_slope_ci_lo: float | None  # 95 % HAC interval
    inflight_slope_ci_hi: float | None
    inflight_slope_p: float | None  # one-sided, H1: slope > 0
    hac_maxlags: int | None


def warmup_s(e2el_p50_s: float, cfg: SteadyStateConfig) -> float:
    """Seconds of arrivals to discard before measuring: ``warmup_factor`` request lifetimes
    (bounded by ``min_warmup_s`` / ``max_window_s``). An open queue fed at a constant rate relaxes
    to its stationary in-flight count over a few lifetimes (M/G/inf: exactly one lifetime to fill;
    queueing stretches it), so three lifetimes leave the window starting near equilibrium."""
    return float(min(cfg.max_window_s, max(cfg.min_warmup_s, cfg.warmup_factor * e2el_p50_s)))


def measure_window_s(e2el_p50_s: float, cfg: SteadyStateConfig, rate_req_per_s: float | None = None) -> float:
    """Seconds of measured arrivals: ``window_factor`` x E2E p50, and long enough at ``rate_req_per_s``
    (open loop) for ``min_requests`` arrivals, within [min_window_s, max_window_s]. A p50 that is
    unknown, zero or NaN gives the longest window."""
    if not e2el_p50_s > 0 or math.isinf(e2el_p50_s):
        return float(cfg.max_window_s)
    want = cfg.window_factor * e2el_p50_s
    if rate_req_per_s and math.isfinite(rate_req_per_s):
        want = max(want, cfg.min_requests / rate_req_per_s)
    return float(min(cfg.max_window_s, max(cfg.min_window_s, want)))


def inflight_at(records: list[Record], times: np.ndarray) -> np.ndarray:
    """Requests in flight (sent, not yet ended) at each of ``times``; a record that never ended
    stays in flight. Records never sent do not count."""
    sent = [r for r in records if r.send_s is not None]
    sends = np.sort([r.send_s for r in sent])
    ends = np.sort([r.end_s if r.end_s is not None else np.inf for r in sent])
    return (np.searchsorted(sends, times, side="right") - np.searchsorted(ends, times, side="right")).astype(float)


def _trend(t: np.ndarray, y: np.ndarray, maxlags: int) -> tuple[float, float, float, float]:
    """(slope, ci_lo, ci_hi, one-sided p for slope > 0) of y on t, HAC standard error."""
    if np.ptp(y) == 0:  # a flat count (closed loop at its cap): no trend, no variance to test
        return 0.0, 0.0, 0.0, 1.0
    import statsmodels.api as sm  # heavy: imported when a step is judged, not when loadgen starts

    fit = sm.OLS(y, sm.add_constant(t)).fit(cov_type="HAC", cov_kwds={"maxlags": maxlags})
    slope, se = float(fit.params[1]), float(fit.bse[1])
    lo, hi = (float(v) for v in fit.conf_int(0.05)[1])
    if not se > 0:
        return slope, lo, hi, (0.0 if slope > 0 else 1.0)
    from scipy import stats as sps

    return slope, lo, hi, float(sps.norm.sf(slope / se))  # HAC inference is asymptotic: normal


def steady_state(records: list[Record], offered_req_per_s: float | None,
                 cfg: SteadyStateConfig) -> SteadyState:
    """Judge one step (module docstring). ``records``: all of the step's, warm-up included (they
    are in flight at the window's start); the window spans the measured (non-warm-up) sends."""
    measured = sorted(r.send_s for r in records if not r.warmup and r.send_s is not None)
    offered = None if offered_req_per_s is None or math.isinf(offered_req_per_s) else float(offered_req_per_s)
    base = dict(offered_req_per_s=offered, e2el_p50_s=None, arrivals=0, departures=0, failed=0,
                arrival_req_per_s=0.0, completion_req_per_s=0.0, departure_over_arrival=None,
                inflight_mean=None, inflight_slope_per_s=None, inflight_slope_ci_lo=None,
                inflight_slope_ci_hi=None, inflight_slope_p=None, hac_maxlags=None)
    if len(measured) < 2:
        return SteadyState(reached=False, window_s=0.0, reason=f"not steady: {len(measured)} measured "
                           "request(s) sent, no window to judge", **base)
    a, b = measured[0], measured[-1]
    window = b - a
    sent = [r for r in records if r.send_s is not None]
    in_window = [r for r in sent if a <= r.send_s <= b]
    ended = [r for r in sent if r.end_s is not None and a <= r.end_s <= b]
    lifetimes = [r.end_s - r.send_s for r in in_window if r.end_s is not None]
    p50 = float(np.median(lifetimes)) if lifetimes else math.inf  # none ended: longer than anything
    base.update(e2el_p50_s=p50 if math.isfinite(p50) else None, arrivals=len(in_window),
                departures=len(ended), failed=sum(not r.success for r in ended))
    if window > 0:
        base.update(arrival_req_per_s=len(in_window) / window,
                    completion_req_per_s=sum(r.success for r in ended) / window)
    base["departure_over_arrival"] = len(ended) / len(in_window)
    if len(in_window) < cfg.min_requests:
        return SteadyState(reached=False, window_s=window, reason=(
            f"not steady: {len(in_window)} arrivals in the window, fewer than min_requests "
            f"{cfg.min_requests}"), **base)
    if not window >= cfg.min_window_lifetimes * p50:
        life = f"{p50:.2f} s" if math.isfinite(p50) else "longer than the step (none ended)"
        return SteadyState(reached=False, window_s=window, reason=(
            f"not steady: the window ({window:.2f} s) is shorter than {cfg.min_window_lifetimes:g} request "
            f"lifetimes (E2E p50 {life}): it measured the ramp"), **base)

    t = np.linspace(a, b, GRID_POINTS)
    y = inflight_at(records, t)
    dt = float(t[1] - t[0])
    maxlags = int(min(GRID_POINTS // 4, max(1, math.ceil(2 * p50 / dt))))
    slope, lo, hi, p = _trend(t - a, y, maxlags)
    mean = float(y.mean())
    base.update(inflight_mean=mean, inflight_slope_per_s=slope, inflight_slope_ci_lo=lo,
                inflight_slope_ci_hi=hi, inflight_slope_p=p, hac_maxlags=maxlags)
    rise = slope * window
    ratio = base["departure_over_arrival"]
    fails = f"; {base['failed']} of the departures failed" if base["failed"] else ""
    balance = f"departures {len(ended)} of {len(in_window)} arrivals ({100 * ratio:.0f} %)"
    trend = f"in-flight slope {slope:+.3g}/s (95 % {lo:+.3g}..{hi:+.3g}, p={p:.2g}), mean {mean:.1f}"
    growing = p < cfg.trend_alpha and rise >= max(1.0, cfg.completion_tolerance * mean)
    # arrivals - departures = in flight at the window's end - at its start (flow conservation).
    # The window ends on a send, so a steady queue still leaves ~1 more in flight at the end, and
    # two in-flight counts differ by about sqrt(2 L) (Poisson-like, L the mean in flight): allow
    # that, 2 sds of it, before a shortfall beyond the tolerance counts ("8 of 9" at L = 0.1
    # failed a plain 90 % bar on a server with nothing queued).
    allowance = 1.0 + 2.0 * math.sqrt(2.0 * mean)
    short = len(in_window) - len(ended) > cfg.completion_tolerance * len(in_window) + allowance
    if growing or short:
        why = []
        if growing:
            why.append(f"in-flight requests grew by {slope:.3g}/s ({rise:.1f} over the {window:.1f} s window; "
                       f"p={p:.2g}): a backlog is building")
        if short:
            why.append(f"completions fell behind arrivals: {balance}, short by more than "
                       f"{100 * cfg.completion_tolerance:.0f} % of arrivals plus {allowance:.1f} (the "
                       f"in-flight count's own noise)")
        return SteadyState(reached=False, window_s=window,
                           reason="not steady: " + "; ".join(why) + f" [{trend}]{fails}", **base)
    return SteadyState(reached=True, window_s=window, reason=f"steady: {balance}; {trend}{fails}", **base)
