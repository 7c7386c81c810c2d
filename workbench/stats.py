"""Intervals, paired tests and verdicts: the statistics every reported figure goes through.

Pure functions over raw records (per-question correctness, per-document log-likelihoods,
per-request latencies). scipy does the statistics; this module chooses the method for each kind
of figure, and says so in the result:

- a share (accuracy, goodput, SLO attainment): Wilson score interval (``scipy.stats.binomtest``);
- a difference in accuracy on the same questions: exact McNemar test on the discordant pairs
  (a two-sided binomial test), with the difference's interval conditional on the discordant count;
- a percentile (TTFT, TPOT, ITL, E2EL): the distribution-free order-statistic interval, ranks from
  ``scipy.stats.binom`` (what ``scipy.stats.quantile_test`` computes, in one pass for several
  percentiles). Too few samples for an upper bound (a p99 needs 368 at 95 %) gives ``hi=None``:
  the p99 is then only known to be at least ``lo``, the way MLPerf LoadGen's early-stopping
  estimate refuses to claim a tail percentile that the sample cannot support;
- "p-quantile <= limit" (an SLO): a one-sided binomial test on the count of requests over the
  limit (MLPerf LoadGen's early-stopping test), giving pass, fail or undecided;
- a mean over repeats (achieved rate, throughput): Student's t interval (``scipy.stats.t``);
- perplexity and its change to another variant on the same documents: percentile bootstrap over
  documents (``scipy.stats.bootstrap``, paired, seeded);
- two latency samples (a drift control, two variants at one rate): Mann-Whitney U.

An ``Estimate`` is a point value with its interval; a ``Comparison`` is a difference with its
interval, a p-value where the method has one, and whether the evidence separates the two.

    python -m pytest tests/test_stats.py         # checked against scipy reference calls
    python benchmarks/stats_intervals.py         # cost of every interval of a 100,000-request report
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import stats

LEVEL = 0.95  # confidence level of every interval
ALPHA = 1 - LEVEL  # significance level of every test
BOOTSTRAP_RESAMPLES = 2000


class Estimate(BaseModel):
    """A point estimate and its two-sided interval. ``lo``/``hi`` None: not bounded by the data
    (e.g. a p99 from fewer than 368 samples has no upper bound)."""

    model_config = ConfigDict(extra="forbid")

    value: float | None
    lo: float | None = None
    hi: float | None = None
    n: int = 0
    level: float = LEVEL
    method: str = ""
    note: str | None = None

    @property
    def half_width(self) -> float | None:
        if self.lo is None or self.hi is None:
            return None
        return (self.hi - self.lo) / 2

    def text(self, fmt: str = ".3g", scale: float = 1.0, unit: str = "") -> str:
        """``0.233 [0.118, 0.409]`` (an unbounded side as ``?``/``∞``)."""
        if self.value is None:
            return "n/a"

        def f(x: float | None, missing: str) -> str:
            return missing if x is None else format(x * scale, fmt)

        return f"{f(self.value, 'n/a')}{unit} [{f(self.lo, '?')}, {f(self.hi, '∞')}]"


class Comparison(BaseModel):
    """``a`` against ``b`` on the same units: the difference (a - b, or a's % change over b), its
    interval, a p-value where the method has one, and whether the evidence separates them."""

    model_config = ConfigDict(extra="forbid")

    diff: Estimate
    p_value: float | None = None
    significant: bool
    method: str
    n: int
    # roughly how many units (questions, documents, requests) would make the observed
    # difference significant at the same effect size; None when the difference is zero
    n_to_resolve: int | None = None
    details: dict = {}

    def text(self, fmt: str = ".3g", unit: str = "") -> str:
        p = "" if self.p_value is None else f", p = {self.p_value:.2g}"
        verdict = "significant" if self.significant else "not significant"
        return f"{self.diff.text(fmt, unit=unit)} ({verdict}{p}, n = {self.n})"


class Verdict(str, Enum):
    passed = "pass"
    failed = "fail"
    undecided = "undecided"


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# --- shares ------------------------------------------------------------------------------------

def proportion(k: int, n: int, level: float = LEVEL) -> Estimate:
    """k successes of n: the share with its Wilson score interval (0 of n and n of n included)."""
    if n <= 0:
        return Estimate(value=None, n=0, level=level, method="wilson", note="no samples")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return Estimate(value=k / n, lo=_f(ci.low), hi=_f(ci.high), n=int(n), level=level, method="wilson")


def share_at_least(k: int, n: int, share: float, alpha: float = ALPHA) -> Verdict:
    """Is the true share >= ``share``? pass/fail only when a one-sided binomial test says so."""
    if n <= 0:
        return Verdict.undecided
    if share <= 0:
        return Verdict.passed
    if share >= 1:
        return Verdict.failed if k < n else Verdict.undecided
    if stats.binomtest(int(k), int(n), share, alternative="greater").pvalue < alpha:
        return Verdict.passed
    if stats.binomtest(int(k), int(n), share, alternative="less").pvalue < alpha:
        return Verdict.failed
    return Verdict.undecided


# --- percentiles -------------------------------------------------------------------------------

def min_samples_for_upper_bound(p: float, level: float = LEVEL) -> int:
    """Fewest samples whose maximum bounds the p-th percentile from above (two-sided ``level``):
    the largest order statistic bounds it once P(all below) = (p/100)^n <= (1 - level) / 2."""
    return int(math.ceil(math.log((1 - level) / 2) / math.log(p / 100)))


def percentiles(values: Sequence[float] | np.ndarray, ps: Sequence[float],
                level: float = LEVEL) -> dict[float, Estimate]:
    """The p-th percentiles (numpy's linear interpolation, as ``vllm bench serve``) with their
    distribution-free order-statistic intervals: the ranks come from Binomial(n, p/100), as in
    ``scipy.stats.quantile_test``; one partial sort serves every percentile (fast on 10^7 values)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return {p: Estimate(value=None, n=0, level=level, method="order statistic", note="no samples")
                for p in ps}
    a = (1 - level) / 2
    ranks: dict[float, tuple[int | None, int | None]] = {}
    for p in ps:
        dist = stats.binom(n, p / 100)
        # lo: the l-th smallest with P(B < l) <= a, i.e. l = ppf(a) (1-based, capped at 0 = none);
        # hi: the u-th smallest with P(B >= u) <= a, i.e. u = isf(a) + 1 (> n = none).
        lo_rank = int(dist.ppf(a))
        hi_rank = int(dist.isf(a)) + 1
        if lo_rank >= 1 and dist.cdf(lo_rank - 1) > a:
            lo_rank -= 1
        ranks[p] = (lo_rank if lo_rank >= 1 else None, hi_rank if hi_rank <= n else None)
    kth = sorted({r - 1 for lr in ranks.values() for r in lr if r is not None}
                 | {min(n - 1, int(math.floor((n - 1) * p / 100))) for p in ps}
                 | {min(n - 1, int(math.floor((n - 1) * p / 100)) + 1) for p in ps})
    part = np.partition(x, kth) if n > 1 else x
    out = {}
    for p in ps:
        pos = (n - 1) * p / 100  # numpy's "linear" method on the partitioned array
        i = int(math.floor(pos))
        j = min(i + 1, n - 1)
        value = float(part[i] + (part[j] - part[i]) * (pos - i))
        lo_rank, hi_rank = ranks[p]
        note = None
        if hi_rank is None:
            need = f"needs >= {min_samples_for_upper_bound(p, level)}" if p < 100 else "no sample size can"
            note = (f"{n} samples cannot bound p{p:g} from above ({need}): "
                    f"read it as at least {float(part[lo_rank - 1]) if lo_rank else float(x.min()):.4g}")
        out[p] = Estimate(value=value, lo=float(part[lo_rank - 1]) if lo_rank else None,
                          hi=float(part[hi_rank - 1]) if hi_rank else None, n=n, level=level,
                          method="order statistic", note=note)
    return out


def percentile(values, p: float, level: float = LEVEL) -> Estimate:
    return percentiles(values, [p], level)[p]


def quantile_within(values, limit: float, p: float, alpha: float = ALPHA) -> Verdict:
    """Is the p-th percentile <= ``limit``? The count over the limit is Binomial(n, 1 - p/100)
    when the percentile sits exactly at the limit: pass when significantly fewer exceed it, fail
    when significantly more do (MLPerf LoadGen's early-stopping test), else undecided."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return Verdict.undecided
    over = int(np.count_nonzero(~(x <= limit)))  # NaN (no value) counts as over, conservatively
    tail = 1 - p / 100
    if stats.binomtest(over, n, tail, alternative="less").pvalue < alpha:
        return Verdict.passed
    if stats.binomtest(over, n, tail, alternative="greater").pvalue < alpha:
        return Verdict.failed
    return Verdict.undecided


# --- means over repeats --------------------------------------------------------------------------

def mean(values: Sequence[float], level: float = LEVEL, nonnegative: bool = True) -> Estimate:
    """The mean of repeated measurements with Student's t interval; one repeat has no interval.
    ``nonnegative``: the quantity cannot be below 0 (a rate), so the interval is cut there."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = x.size
    if n == 0:
        return Estimate(value=None, n=0, level=level, method="t", note="no samples")
    m = float(x.mean())
    if n < 2:
        return Estimate(value=m, n=1, level=level, method="t", note="one repeat: no interval")
    sem = float(stats.sem(x))
    if sem == 0:
        return Estimate(value=m, lo=m, hi=m, n=n, level=level, method="t")
    lo, hi = stats.t.interval(level, n - 1, loc=m, scale=sem)
    return Estimate(value=m, lo=max(float(lo), 0.0) if nonnegative and m >= 0 else float(lo), hi=float(hi), n=n,
                    level=level, method="t")


# --- paired accuracy -----------------------------------------------------------------------------

def mcnemar(a: Sequence[bool], b: Sequence[bool], level: float = LEVEL) -> Comparison:
    """Accuracy of ``a`` minus ``b`` on the same questions, with the exact McNemar test.

    Only discordant questions carry information: ``a_only`` (a right, b wrong) and ``b_only``.
    Under no difference, a_only ~ Binomial(a_only + b_only, 1/2): the exact two-sided binomial
    test gives the p-value. The difference (a_only - b_only) / n gets a conservative interval from
    the two discordant shares' Wilson intervals (lo_a - hi_b, hi_a - lo_b), which stays honest
    with few or no discordant questions, where intervals conditional on their count collapse."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    n = int(a.size)
    a_only = int(np.count_nonzero(a & ~b))
    b_only = int(np.count_nonzero(b & ~a))
    m = a_only + b_only
    method = "mcnemar exact"
    details = {"a_only": a_only, "b_only": b_only, "a_acc": float(a.mean()) if n else None,
               "b_acc": float(b.mean()) if n else None}
    if n == 0:
        return Comparison(diff=Estimate(value=None, n=0, method=method), significant=False,
                          method=method, n=0, details=details)
    pa, pb = proportion(a_only, n, level), proportion(b_only, n, level)
    est = Estimate(value=(a_only - b_only) / n, lo=pa.lo - pb.hi, hi=pa.hi - pb.lo, n=n, level=level,
                   method="difference of discordant shares (Wilson, conservative)")
    p = float(stats.binomtest(a_only, m, 0.5).pvalue) if m else 1.0
    significant = p < 1 - level
    return Comparison(diff=est, p_value=p, significant=significant, method=method, n=n,
                      n_to_resolve=None if significant else _mcnemar_n_to_resolve(a_only, b_only, n, 1 - level),
                      details=details)


def _mcnemar_n_to_resolve(a_only: int, b_only: int, n: int, alpha: float) -> int | None:
    """Questions needed for the same discordant shares to reach p < alpha (None: no difference).
    A bisection over the scale factor: p falls as the counts grow at a fixed ratio."""
    if a_only == b_only:
        return None

    def p_at(scale: float) -> float:
        x, y = int(round(a_only * scale)), int(round(b_only * scale))
        return stats.binomtest(x, x + y, 0.5).pvalue if x + y else 1.0

    lo, hi = 1.0, 10_000.0
    if p_at(hi) >= alpha:
        return None
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if p_at(mid) < alpha else (mid, hi)
    return int(math.ceil(n * hi))


# --- perplexity ----------------------------------------------------------------------------------

def _boot(data: tuple[np.ndarray, ...], statistic: Callable, level: float, seed: int) -> tuple[float, float]:
    res = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def perplexity(loglik: Sequence[float], words: Sequence[float], level: float = LEVEL,
               seed: int = 0) -> Estimate:
    """Word perplexity exp(-sum(loglik) / sum(words)) over documents, with a percentile bootstrap
    interval over documents (what lm-eval's ``word_perplexity`` aggregates)."""
    ll = np.asarray(loglik, dtype=float)
    w = np.asarray(words, dtype=float)
    n = ll.size
    if n == 0 or w.sum() <= 0:
        return Estimate(value=None, n=n, level=level, method="bootstrap over documents", note="no documents")
    value = float(np.exp(-ll.sum() / w.sum()))
    if n < 2:
        return Estimate(value=value, n=n, level=level, method="bootstrap over documents",
                        note="one document: no interval")

    def stat(ll, w, axis=-1):
        return np.exp(-ll.sum(axis=axis) / w.sum(axis=axis))

    lo, hi = _boot((ll, w), stat, level, seed)
    return Estimate(value=value, lo=lo, hi=hi, n=n, level=level, method="bootstrap over documents")


def perplexity_change(loglik_a: Sequence[float], loglik_b: Sequence[float], words: Sequence[float],
                      level: float = LEVEL, seed: int = 0) -> Comparison:
    """a's word perplexity as a % change over b's, on the same documents, with a paired percentile
    bootstrap over documents. Significant when the interval excludes 0."""
    la, lb, w = (np.asarray(v, dtype=float) for v in (loglik_a, loglik_b, words))
    if not (la.size == lb.size == w.size):
        raise ValueError(f"paired documents differ in length: {la.size}, {lb.size}, {w.size}")
    n = la.size
    method = "paired bootstrap over documents"
    if n == 0 or w.sum() <= 0:
        return Comparison(diff=Estimate(value=None, n=0, method=method), significant=False, method=method, n=0)

    def stat(la, lb, w, axis=-1):
        return 100 * (np.exp((lb.sum(axis=axis) - la.sum(axis=axis)) / w.sum(axis=axis)) - 1)

    value = float(stat(la, lb, w))
    if n < 2:
        return Comparison(diff=Estimate(value=value, n=n, level=level, method=method,
                                        note="one document: no interval"),
                          significant=False, method=method, n=n)
    lo, hi = _boot((la, lb, w), stat, level, seed)
    significant = lo > 0 or hi < 0
    return Comparison(diff=Estimate(value=value, lo=lo, hi=hi, n=n, level=level, method=method),
                      significant=significant, method=method, n=n,
                      n_to_resolve=None if significant else n_to_resolve(value, lo, hi, n))


def n_to_resolve(value: float, lo: float | None, hi: float | None, n: int) -> int | None:
    """Units needed for an interval of this width to exclude zero at the observed difference
    (width shrinks as 1/sqrt(n)); None for a zero difference or no interval."""
    if value == 0 or lo is None or hi is None or hi <= lo:
        return None
    half = (hi - lo) / 2
    return int(math.ceil(n * (half / abs(value)) ** 2))


# --- two latency samples -------------------------------------------------------------------------

def compare_samples(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Comparison:
    """Two independent samples (a drift control's start and end; two variants at one rate): the
    ratio of medians a/b, with Mann-Whitney U's two-sided p-value deciding significance, and the
    ratio's interval from the medians' own order-statistic intervals (conservative)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    method = "mann-whitney u"
    if x.size == 0 or y.size == 0:
        return Comparison(diff=Estimate(value=None, n=0, method=method), significant=False,
                          method=method, n=int(x.size + y.size))
    mx, my = percentile(x, 50, level), percentile(y, 50, level)
    ratio = mx.value / my.value if my.value else None
    lo = mx.lo / my.hi if mx.lo is not None and my.hi else None
    hi = mx.hi / my.lo if mx.hi is not None and my.lo else None
    p = float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue) if x.size and y.size else None
    significant = p is not None and p < 1 - level
    return Comparison(diff=Estimate(value=ratio, lo=lo, hi=hi, n=int(x.size + y.size), level=level,
                                    method="ratio of medians"),
                      p_value=p, significant=significant, method=method, n=int(x.size + y.size),
                      details={"a_median": mx.value, "b_median": my.value, "a_n": int(x.size),
                               "b_n": int(y.size)})
