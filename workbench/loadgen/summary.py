"""Typed load-test results with their intervals: what the load-test report stores and the report
stage reads. Tables, plots and MLflow keys are views of these objects; nothing reads a view back.

- ``StepSummary``: one step (one variant, one offered rate, one repeat), from its raw records.
- ``RateSummary``: every repeat of one variant at one rate, pooled: latency percentiles over all
  their requests, goodput over all their requests, achieved rate and throughput as a mean over
  repeats (Student's t: an interval needs two repeats or more), and the SLO verdict.
- ``DriftCheck``: a control step measured at the start and again at the end of a run.

Requests of one step are not independent (they share a queue and a host: lag-1 autocorrelation
0.4-0.8 in the H200 records), so every interval here treats a block of consecutive requests, in
send order, as the unit (``timestats``): a percentile's order-statistic interval and goodput's
Wilson interval at the effective sample size n / τ from the circular block bootstrap, a mean
by batch means. A p99 from too few effective requests has no upper bound and says so. The SLO
verdict is pass / fail only when the whole interval lies on one side of the limit
(``timestats.within`` / ``at_least``); otherwise ``undecided``, which the report treats as not
shown to fail.

Across repeats (``rate_summaries``) the point is the pooled value and the interval covers both
the block interval over every repeat's requests (blocks never cross from one step to the next)
and, with 3 repeats or more, Student's t over the repeats' own values: the repeat is the unit that
sees a host drifting between steps, and 2 repeats are too few to estimate that (t with 1 df).
Comparisons between arms and the drift of a control take one summary per block, never the
requests: ``workbench/loadtest/compare.py`` on ``timecompare``'s statistics.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
from scipy import stats as ss

from workbench import stats
from workbench.config import SLOConfig
from workbench.loadgen import metrics as m
from workbench.loadgen import timecompare as tc
from workbench.loadgen import timestats as ts
from workbench.loadgen.client import Record
from workbench.loadgen.columns import Columns, columns

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


class Distribution(BaseModel):
    """One latency of one step or rate, in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    n: int
    mean_ms: float | None
    p: dict[str, stats.Estimate]  # "p50", "p90", "p99"
    mean: stats.Estimate | None = None  # mean_ms with its batch-means interval

    def at(self, pct: int) -> stats.Estimate:
        return self.p[f"p{pct}"]


class SLOVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft: stats.Verdict | None = None  # TTFT p<ttft_percentile> <= slo.ttft_ms
    goodput: stats.Verdict  # share of good requests >= slo.min_goodput
    overall: stats.Verdict

    @classmethod
    def of(cls, ttft: stats.Verdict | None, goodput: stats.Verdict) -> "SLOVerdict":
        parts = [v for v in (ttft, goodput) if v is not None]
        if any(v is stats.Verdict.failed for v in parts):
            overall = stats.Verdict.failed
        elif all(v is stats.Verdict.passed for v in parts):
            overall = stats.Verdict.passed
        else:
            overall = stats.Verdict.undecided
        return cls(ttft=ttft, goodput=goodput, overall=overall)


# An offered rate in requests/s. JSON has no infinity, so pydantic writes an unbounded one (a
# closed-loop step, or a rate of .inf: all at once) as null; it is read back as inf.
OfferedRate = Annotated[float, BeforeValidator(lambda v: float("inf") if v is None else v),
                        WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "null"}],
                                        "description": "requests/s; null: unbounded (closed loop, or all at once)"})]


class StepSummary(BaseModel):
    """One step: a variant at one offered rate, one repeat. ``position`` is its place in the run
    (interleaved runs alternate variants), ``started_unix`` its wall-clock start."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    label: str
    offered_req_per_s: OfferedRate
    repeat: int = 0
    position: int = 0
    role: str = "measure"  # measure | control-start | control-end | knee
    started_unix: float | None = None
    requests: int
    completed: int
    achieved_req_per_s: float | None = None
    request_throughput_req_per_s: float | None = None
    output_tokens_per_s: float | None = None
    goodput: stats.Estimate  # share of requests within every SLO
    success: stats.Estimate
    latency: dict[str, Distribution]  # ttft, tpot, itl, e2el
    slo: SLOVerdict
    errors: dict[str, int] = {}
    limited_by: str = ""
    utilization_pct: float | None = None
    utilization_of: str = ""
    records_file: str | None = None  # the raw records
    # (loadexec, issue 27) its counterbalanced block (workbench/loadtest/plan.py), a closed-loop
    # step's requests in flight (None: open loop), and its steady-state judgement
    # (workbench/loadgen/steady.py: reached, reason, arrival/completion rates, in-flight slope).
    block: int | None = None
    concurrency: int | None = None
    steady_state: dict | None = None


class RateSummary(BaseModel):
    """Every measured repeat of one variant at one offered rate, pooled."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    offered_req_per_s: OfferedRate
    repeats: int
    requests: int
    achieved_req_per_s: stats.Estimate
    request_throughput_req_per_s: stats.Estimate
    output_tokens_per_s: stats.Estimate
    goodput: stats.Estimate
    latency: dict[str, Distribution]
    slo: SLOVerdict
    errors: int = 0
    utilization_pct: float | None = None
    utilization_of: str = ""
    limited_by: list[str] = []
    # (loadexec, issue 27) closed loop: requests in flight (None: open loop); how many of its steps
    # reached steady state, as text ("2/3 steady; 1 undecided"; "" when none was judged).
    concurrency: int | None = None
    steady_state: str = ""


class DriftCheck(BaseModel):
    """The control configuration, first and last step of a run, compared on TTFT and E2EL."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    offered_req_per_s: float
    ttft: stats.Comparison  # end / start, ratio of medians
    e2el: stats.Comparison
    drifted: bool
    verdict: str


def distribution(values_ms: np.ndarray, segments: list[int] | None = None) -> Distribution:
    """Percentiles and mean of time-ordered values with their block intervals; ``segments``:
    each pooled step's count, so that no block crosses from one step to the next."""
    arr = np.asarray(values_ms, dtype=float)
    n = int(np.count_nonzero(~np.isnan(arr)))
    mean = ts.mean(arr, segments=segments)
    return Distribution(n=n, mean_ms=mean.value, mean=mean,
                        p={f"p{p}": e for p, e in ts.percentiles(arr, PERCENTILES, segments=segments).items()})


def latency(cols: Columns) -> dict[str, Distribution]:
    return {k: distribution(getattr(cols, f"{k}_ms"), cols.seg(k)) for k in LATENCIES}


def goodput(cols: Columns, level: float = stats.LEVEL) -> stats.Estimate:
    """The share of measured requests within every SLO, in send order, with its block interval
    (the SLO's TTFT series sets the block length)."""
    return ts.share(cols.good_flags, level, proxy=cols.slo_ttft_ms, segments=cols.seg("n"))


def look_level(max_looks: int) -> float:
    """The interval level for each look of an SLO test repeated on pooled data up to
    ``max_looks`` times (a knee probe measured again while undecided): a pass needs the whole
    interval under the limit, a one-sided test at (1 - level) / 2, so Bonferroni over the looks
    (``stats.look_alpha``) keeps the chance of any false pass at most 5 %. Never below the
    single look's ``stats.LEVEL``."""
    return max(stats.LEVEL, 1 - 2 * stats.look_alpha(max_looks))


def slo_verdict(cols: Columns, slo: SLOConfig, good: stats.Estimate | None = None,
                ttft_p: stats.Estimate | None = None, level: float = stats.LEVEL) -> SLOVerdict:
    """TTFT p<ttft_percentile> <= ttft_ms and goodput >= min_goodput, each decided by its block
    interval at ``level`` (pass: all of it on the right side; fail: all on the wrong side)."""
    ttft = None
    if slo.ttft_ms is not None:  # a failed request never showed a first token: over the limit
        est = ttft_p or ts.percentile(cols.slo_ttft_ms, slo.ttft_percentile, level, segments=cols.seg("n"))
        ttft = ts.within(est, slo.ttft_ms)
    return SLOVerdict.of(ttft, ts.at_least(good or goodput(cols, level), slo.min_goodput))


def step_summary(variant: str, label: str, rate: float, records: list[Record], slo: SLOConfig,
                 flat: dict[str, float], cols: Columns | None = None, **extra) -> StepSummary:
    """The typed summary of one step; ``flat`` is its ``metrics.step_metrics`` plus probes."""
    cols = cols or columns(records, slo)
    util = next((k for k in ("gpu_util_pct_mean", "cpu_util_pct_mean") if k in flat), None)
    good = goodput(cols)
    return StepSummary(
        variant=variant, label=label, offered_req_per_s=rate, requests=cols.n, completed=cols.ok,
        achieved_req_per_s=flat.get("achieved_req_per_s"),
        request_throughput_req_per_s=flat.get("request_throughput_req_per_s"),
        output_tokens_per_s=flat.get("output_tokens_per_s"),
        goodput=good, success=ts.share(cols.ok_flags, segments=cols.seg("n")),
        latency=latency(cols), slo=slo_verdict(cols, slo, good),
        errors=m.errors_by_kind([r for r in records if not r.warmup]),
        utilization_pct=flat.get(util) if util else None, utilization_of=util.split("_")[0] if util else "",
        **extra)


def over_repeats(pooled: stats.Estimate, values: list[float | None], log: bool = True) -> stats.Estimate:
    """``pooled`` (the block interval over every repeat's requests), widened to cover Student's t
    over the repeats' own values (on the log scale for a latency) where there are 3 or more: the
    repeat is the unit that sees the host move between steps."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and (x > 0 or not log)], float)
    if v.size < 3 or pooled.value is None:
        return pooled
    u = np.log(v) if log else v
    half = float(ss.t.ppf(0.5 + pooled.level / 2, v.size - 1) * u.std(ddof=1) / np.sqrt(v.size))
    lo, hi = u.mean() - half, u.mean() + half
    lo, hi = (float(np.exp(lo)), float(np.exp(hi))) if log else (max(float(lo), 0.0), min(float(hi), 1.0))
    wider = (pooled.lo is None or lo < pooled.lo) or (pooled.hi is not None and hi > pooled.hi)
    return pooled.model_copy(update={
        "lo": None if pooled.lo is None else min(pooled.lo, lo),
        "hi": None if pooled.hi is None else max(pooled.hi, hi),
        "method": f"{pooled.method}; covering t over {v.size} repeats" + (" (wider)" if wider else "")})


def rate_summaries(steps: list[StepSummary], cols: dict[int, Columns], slo: SLOConfig) -> list[RateSummary]:
    """Pool the measured steps (role ``measure``/``control-start``/``knee``) of each (variant,
    rate and concurrency). ``cols`` maps a step's position to its requests' columns. Intervals:
    ``over_repeats``."""
    groups: dict[tuple[str, float, int | None], list[StepSummary]] = defaultdict(list)
    for s in steps:
        if s.role != "control-end":
            groups[(s.variant, s.offered_req_per_s, s.concurrency)].append(s)
    out = []
    for (variant, rate, concurrency), group in groups.items():
        pooled = cols[group[0].position]
        for s in group[1:]:
            pooled = pooled + cols[s.position]
        utils = [s.utilization_pct for s in group if s.utilization_pct is not None]
        one = group[0] if len(group) == 1 else None  # one step: its own summary is the pooled one
        if one:
            lat, good, verdict = one.latency, one.goodput, one.slo
        else:
            lat = latency(pooled)
            for k, dist in lat.items():
                for pk, est in dist.p.items():
                    dist.p[pk] = over_repeats(est, [s.latency[k].p[pk].value for s in group])
            good = over_repeats(goodput(pooled), [s.goodput.value for s in group], log=False)
            ttft_p = None
            if slo.ttft_ms is not None:
                ttft_p = over_repeats(ts.percentile(pooled.slo_ttft_ms, slo.ttft_percentile, segments=pooled.seg("n")),
                                      [ts.percentile(cols[s.position].slo_ttft_ms, slo.ttft_percentile).value
                                       for s in group])
            verdict = slo_verdict(pooled, slo, good, ttft_p)
        out.append(RateSummary(
            variant=variant, offered_req_per_s=rate, repeats=len(group), requests=pooled.n,
            achieved_req_per_s=stats.mean([s.achieved_req_per_s for s in group]),
            request_throughput_req_per_s=stats.mean([s.request_throughput_req_per_s for s in group]),
            output_tokens_per_s=stats.mean([s.output_tokens_per_s for s in group]),
            goodput=good, latency=lat, slo=verdict, errors=pooled.n - pooled.ok,
            utilization_pct=float(np.mean(utils)) if utils else None,
            utilization_of=group[0].utilization_of,
            limited_by=sorted({s.limited_by for s in group if s.limited_by}),
            concurrency=concurrency, steady_state=steady_text(group)))
    return sorted(out, key=lambda r: (r.variant, r.concurrency or 0, r.offered_req_per_s))


def steady_text(group: list[StepSummary]) -> str:
    """How many of a rate's steps reached steady state (loadgen/steady.py), as a table cell."""
    judged = [s.steady_state for s in group if s.steady_state is not None]
    if not judged:
        return ""
    yes = sum(1 for j in judged if j.get("verdict", "steady" if j.get("reached") else "") == "steady")
    no = sum(1 for j in judged if j.get("verdict") == "not sustainable")
    parts = [f"{yes}/{len(judged)} steady"] + ([f"{no} not sustainable"] if no else []) + \
        ([f"{len(judged) - yes - no} undecided"] if len(judged) - yes - no else [])
    return "; ".join(parts)


def compare_steps(a: Columns, b: Columns, latency: str = "ttft", pct: float = 50) -> stats.Comparison:
    """One step (or pooled steps) of arm ``a`` against one of ``b``: the ratio of their p<pct>
    latencies, each with its block interval over its own requests (``timecompare.ratio_of``). It
    accounts for the autocorrelation within each step, not for a host that moved between them:
    with repeats, compare them by block (``workbench/loadtest/compare.py``)."""
    return tc.ratio_of(ts.percentile(getattr(a, f"{latency}_ms"), pct, segments=a.seg(latency)),
                       ts.percentile(getattr(b, f"{latency}_ms"), pct, segments=b.seg(latency)))


def drift_check(start: StepSummary, start_cols: Columns, end_cols: Columns, tolerance: float = 0.1) -> DriftCheck:
    """Did the host drift between the control's first and last measurement? The end/start ratio
    of the median TTFT and E2EL, each median with its block interval over its step's requests
    (``compare_steps``): a significant change of more than ``tolerance`` (a share) in either is
    drift. With a control in every block, ``loadtest.compare.drift_spread`` says more (the load
    test uses that; this first/last check is kept for the benchmarks' old-vs-new comparison)."""
    ttft = compare_steps(end_cols, start_cols, "ttft")
    e2el = compare_steps(end_cols, start_cols, "e2el")
    drifted = any(c.significant and c.diff.value is not None and abs(c.diff.value - 1) > tolerance
                  for c in (ttft, e2el))
    verdict = (f"drift: the control ({start.variant} at {start.offered_req_per_s:g} req/s) changed between "
               f"the start and the end of the run (TTFT end/start {ttft.text('.2f')}; E2EL {e2el.text('.2f')}); "
               "comparisons made during the run are unreliable") if drifted else (
               f"no drift detected: the control ({start.variant} at {start.offered_req_per_s:g} req/s) "
               f"measured at the start and the end agrees (TTFT end/start {ttft.text('.2f')})")
    return DriftCheck(variant=start.variant, offered_req_per_s=start.offered_req_per_s, ttft=ttft,
                      e2el=e2el, drifted=drifted, verdict=verdict)
