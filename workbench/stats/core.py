"""The result types every statistic returns (``Estimate``, ``Comparison``, ``Verdict``), the
confidence level, and the one-sample figures: a share (Wilson), a percentile (order statistics),
"p-quantile <= limit" (a one-sided binomial test), a mean over repeats (Student's t)."""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

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
