"""Typed load-test results with their intervals: what the load-test report stores and the report
stage reads. Tables, plots and MLflow keys are views of these objects; nothing reads a view back.

- ``StepSummary``: one step (one variant, one offered rate, one repeat), from its raw records.
- ``RateSummary``: every repeat of one variant at one rate, pooled: latency percentiles over all
  their requests, goodput over all their requests, achieved rate and throughput as a mean over
  repeats (Student's t: an interval needs two repeats or more), and the SLO verdict.
- ``DriftCheck``: a control step measured at the start and again at the end of a run.

Every percentile carries its order-statistic interval (``workbench.stats.percentiles``); a p99
from too few requests has no upper bound and says so. The SLO verdict is pass / fail only when a
binomial test on the requests supports it (``stats.quantile_within``, ``stats.share_at_least``);
otherwise it is ``undecided``, and the report treats that as not shown to fail.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import chain

import numpy as np
from pydantic import BaseModel, ConfigDict

from workbench import stats
from workbench.config import SLOConfig
from workbench.loadgen import metrics as m
from workbench.loadgen.client import Record

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


class Distribution(BaseModel):
    """One latency of one step or rate, in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    n: int
    mean_ms: float | None
    p: dict[str, stats.Estimate]  # "p50", "p90", "p99"

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


class StepSummary(BaseModel):
    """One step: a variant at one offered rate, one repeat. ``position`` is its place in the run
    (interleaved runs alternate variants), ``started_unix`` its wall-clock start."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    label: str
    offered_req_per_s: float
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
    offered_req_per_s: float
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


@dataclass
class Columns:
    """The measured requests of one or more steps as arrays (milliseconds): extracted from the
    records in one pass, so that every interval after it is vectorized (a report of 100,000
    requests with 128 tokens each holds 12.7 million ITL samples)."""

    ttft_ms: np.ndarray  # successful requests with a first token
    tpot_ms: np.ndarray  # successful requests of more than one token
    e2el_ms: np.ndarray
    itl_ms: np.ndarray  # every gap between token chunks
    slo_ttft_ms: np.ndarray  # every measured request: TTFT for the SLO test, inf for a failure
    good: int  # requests within every SLO (vLLM's goodput)
    ok: int
    n: int

    def __add__(self, other: "Columns") -> "Columns":
        cat = np.concatenate
        return Columns(cat([self.ttft_ms, other.ttft_ms]), cat([self.tpot_ms, other.tpot_ms]),
                       cat([self.e2el_ms, other.e2el_ms]), cat([self.itl_ms, other.itl_ms]),
                       cat([self.slo_ttft_ms, other.slo_ttft_ms]), self.good + other.good,
                       self.ok + other.ok, self.n + other.n)


def columns(records: list[Record], slo: SLOConfig) -> Columns:
    """Latencies as ``metrics`` defines them (vLLM's definitions), warm-up records excluded, and
    the goodput count as ``metrics.is_good`` makes it, over arrays."""
    meas = [r for r in records if not r.warmup]
    ok = [r for r in meas if r.success and r.send_s is not None]
    k = len(ok)
    nan = np.nan
    send = np.fromiter((r.send_s for r in ok), float, k)
    first = np.fromiter((nan if r.first_token_s is None else r.first_token_s for r in ok), float, k)
    last = np.fromiter((r.chunk_s[-1] if r.streamed and r.chunk_s else (nan if r.end_s is None else r.end_s)
                        for r in ok), float, k)
    ntok = np.fromiter((m.output_tokens(r) for r in ok), float, k)
    streamed = np.fromiter((r.streamed for r in ok), bool, k)
    lens = np.fromiter((len(r.chunk_s) for r in ok), np.int64, k)
    flat = np.fromiter(chain.from_iterable(r.chunk_s for r in ok), float, int(lens.sum()))
    gaps = np.diff(flat)
    bounds = np.cumsum(lens)[:-1] - 1  # the gap from one request's last chunk to the next one's first
    gaps = np.delete(gaps, bounds[(bounds >= 0) & (bounds < gaps.size)])
    ttft, e2el = first - send, last - send
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(ntok > 1, (e2el - ttft) / (ntok - 1), nan)
    # goodput: every set SLO holds; a non-streamed reply shows its first token at its end
    slo_ttft = np.where(streamed, ttft, e2el)
    good = np.ones(k, bool)
    for limit, value in ((slo.ttft_ms, slo_ttft), (slo.tpot_ms, np.where(np.isnan(tpot), 0.0, tpot)),
                         (slo.e2el_ms, e2el)):
        if limit is not None:
            good &= value * 1000 <= limit  # nan (no value) is never good
    failed = np.full(len(meas) - k, np.inf)
    return Columns(ttft_ms=ttft[~np.isnan(ttft)] * 1000, tpot_ms=tpot[~np.isnan(tpot)] * 1000,
                   e2el_ms=e2el[~np.isnan(e2el)] * 1000, itl_ms=gaps * 1000,
                   slo_ttft_ms=np.concatenate([np.where(np.isnan(ttft), np.inf, ttft * 1000), failed]),
                   good=int(good.sum()), ok=k, n=len(meas))


def distribution(values_ms: np.ndarray) -> Distribution:
    arr = np.asarray(values_ms, dtype=float)
    return Distribution(n=int(arr.size), mean_ms=float(arr.mean()) if arr.size else None,
                        p={f"p{p}": e for p, e in stats.percentiles(arr, PERCENTILES).items()})


def latency(cols: Columns) -> dict[str, Distribution]:
    return {k: distribution(getattr(cols, f"{k}_ms")) for k in LATENCIES}


def slo_verdict(cols: Columns, slo: SLOConfig) -> SLOVerdict:
    ttft = None
    if slo.ttft_ms is not None:  # a failed request never showed a first token: over the limit
        ttft = stats.quantile_within(cols.slo_ttft_ms, slo.ttft_ms, slo.ttft_percentile)
    return SLOVerdict.of(ttft, stats.share_at_least(cols.good, cols.n, slo.min_goodput))


def step_summary(variant: str, label: str, rate: float, records: list[Record], slo: SLOConfig,
                 flat: dict[str, float], cols: Columns | None = None, **extra) -> StepSummary:
    """The typed summary of one step; ``flat`` is its ``metrics.step_metrics`` plus probes."""
    cols = cols or columns(records, slo)
    util = next((k for k in ("gpu_util_pct_mean", "cpu_util_pct_mean") if k in flat), None)
    return StepSummary(
        variant=variant, label=label, offered_req_per_s=rate, requests=cols.n, completed=cols.ok,
        achieved_req_per_s=flat.get("achieved_req_per_s"),
        request_throughput_req_per_s=flat.get("request_throughput_req_per_s"),
        output_tokens_per_s=flat.get("output_tokens_per_s"),
        goodput=stats.proportion(cols.good, cols.n), success=stats.proportion(cols.ok, cols.n),
        latency=latency(cols), slo=slo_verdict(cols, slo),
        errors=m.errors_by_kind([r for r in records if not r.warmup]),
        utilization_pct=flat.get(util) if util else None, utilization_of=util.split("_")[0] if util else "",
        **extra)


def rate_summaries(steps: list[StepSummary], cols: dict[int, Columns], slo: SLOConfig) -> list[RateSummary]:
    """Pool the measured steps (role ``measure``/``control-start``/``knee``) of each (variant,
    rate). ``cols`` maps a step's position to its requests' columns."""
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
        out.append(RateSummary(
            variant=variant, offered_req_per_s=rate, repeats=len(group), requests=pooled.n,
            achieved_req_per_s=stats.mean([s.achieved_req_per_s for s in group]),
            request_throughput_req_per_s=stats.mean([s.request_throughput_req_per_s for s in group]),
            output_tokens_per_s=stats.mean([s.output_tokens_per_s for s in group]),
            goodput=stats.proportion(pooled.good, pooled.n), latency=one.latency if one else latency(pooled),
            slo=one.slo if one else slo_verdict(pooled, slo), errors=pooled.n - pooled.ok,
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


def drift_check(start: StepSummary, start_cols: Columns, end_cols: Columns, tolerance: float = 0.1) -> DriftCheck:
    """Did the host drift between the control's first and last measurement? Mann-Whitney U on
    TTFT and on E2EL of the two steps' requests: a significant change of more than ``tolerance``
    (a share of the median) in either is drift."""
    ttft = stats.compare_samples(end_cols.ttft_ms, start_cols.ttft_ms)
    e2el = stats.compare_samples(end_cols.e2el_ms, start_cols.e2el_ms)
    drifted = any(c.significant and c.diff.value is not None and abs(c.diff.value - 1) > tolerance
                  for c in (ttft, e2el))
    verdict = (f"drift: the control ({start.variant} at {start.offered_req_per_s:g} req/s) changed between "
               f"the start and the end of the run (TTFT end/start {ttft.text('.2f')}; E2EL {e2el.text('.2f')}); "
               "comparisons made during the run are unreliable") if drifted else (
               f"no drift detected: the control ({start.variant} at {start.offered_req_per_s:g} req/s) "
               f"measured at the start and the end agrees (TTFT end/start {ttft.text('.2f')})")
    return DriftCheck(variant=start.variant, offered_req_per_s=start.offered_req_per_s, ttft=ttft,
                      e2el=e2el, drifted=drifted, verdict=verdict)
