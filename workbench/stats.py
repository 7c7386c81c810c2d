"""Intervals, paired tests and verdicts: the statistics every reported figure goes through.

Pure functions over raw records (per-question correctness, per-document log-likelihoods,
per-request latencies). scipy does the statistics; this module chooses the method for each kind
of figure, and says so in the result:

- a share (accuracy, goodput, SLO attainment): Wilson score interval (``scipy.stats.binomtest``);
- a difference in accuracy on the same questions: Newcombe's method 10 interval for the paired
  difference, and the p-value that inverts it (significant exactly when the interval excludes 0);
- a percentile (TTFT, TPOT, ITL, E2EL): the distribution-free order-statistic interval, ranks from
  ``scipy.stats.binom`` (what ``scipy.stats.quantile_test`` computes, in one pass for several
  percentiles). Too few samples for an upper bound (a p99 needs 368 at 95 %) gives ``hi=None``:
  the p99 is then only known to be at least ``lo``, the way MLPerf LoadGen's early-stopping
  estimate refuses to claim a tail percentile that the sample cannot support;
- "p-quantile <= limit" (an SLO): a one-sided binomial test on the count of requests over the
  limit (MLPerf LoadGen's early-stopping test), giving pass, fail or undecided;
- a mean over repeats (achieved rate, throughput): Student's t interval (``scipy.stats.t``);
- perplexity and its change to another variant on the same documents: a cluster bootstrap over
  source pages (chunks of one page are not independent; paired, seeded) for the standard error of
  the log, with Student's t over pages - 1 degrees of freedom for the interval and the p-value;
- two latency samples (a drift control, two variants at one rate): Mann-Whitney U;
- a family of comparisons (every pair of variants on one criterion): Holm's step-down correction
  (statsmodels); a test repeated on pooled data (a knee probe's repeats): Bonferroni over looks.

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

def _wilson_bounds(k: np.ndarray, n: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score bounds of k / n at normal quantile z (vectorized; what ``proportion`` gives)."""
    p = k / n
    denom = 1 + z ** 2 / n
    center = (p + z ** 2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2)) / denom
    return center - half, center + half


def newcombe_paired(n11, n10, n01, n00, z) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's method 10 (Stat Med 1998;17:2635, "hybrid score, no continuity correction"):
    the interval of p_a - p_b on paired answers, from the two accuracies' Wilson bounds and the
    phi correlation of the 2x2 table (phi = 0 when a margin is empty, as Newcombe sets it).
    ``n10``: a right, b wrong. Vectorized over tables and over z (one interval per z)."""
    n11, n10, n01, n00, z = (np.asarray(x, dtype=float) for x in (n11, n10, n01, n00, z))
    n = n11 + n10 + n01 + n00
    ka, kb = n11 + n10, n11 + n01
    pa, pb = ka / n, kb / n
    la, ua = _wilson_bounds(ka, n, z)
    lb, ub = _wilson_bounds(kb, n, z)
    margins = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(margins > 0, (n11 * n00 - n10 * n01) / np.sqrt(np.where(margins > 0, margins, 1)), 0.0)
    d = pa - pb
    lo = d - np.sqrt(np.maximum((pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2, 0))
    hi = d + np.sqrt(np.maximum((ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2, 0))
    # a difference of shares lies in [-1, 1]; rounding put a bound at -1.0000000000000002 when
    # every discordant answer went one way (0 of 16 against 16 of 16)
    return np.clip(lo, -1.0, 1.0), np.clip(hi, -1.0, 1.0)


# The p-value of a Newcombe interval: the smallest two-sided level at which it touches 0, found
# on this grid of normal quantiles (z up to 8: p down to 1e-15), then refined by bisection.
_Z_GRID = np.linspace(0.0, 8.0, 801)


def newcombe_p_value(n11: int, n10: int, n01: int, n00: int) -> float:
    """Two-sided p-value that matches ``newcombe_paired``: p < alpha exactly when the
    (1 - alpha) interval excludes 0, so a test and its interval never disagree."""
    if n10 == n01:
        return 1.0
    excludes = lambda z: bool(np.all((lambda lo, hi: (lo > 0) | (hi < 0))(  # noqa: E731
        *newcombe_paired(n11, n10, n01, n00, z))))
    lo, hi = newcombe_paired(n11, n10, n01, n00, _Z_GRID)
    inside = ~((lo > 0) | (hi < 0))
    if not inside.any():
        return float(2 * stats.norm.sf(_Z_GRID[-1]))
    first = int(np.argmax(inside))  # the first z whose interval holds 0 (z = 0 never does)
    a, b = _Z_GRID[first - 1], _Z_GRID[first]
    for _ in range(24):  # the grid's 0.01 in z, halved 24 times: p to ~1e-9 relative
        mid = (a + b) / 2
        a, b = (mid, b) if excludes(mid) else (a, mid)
    return float(min(1.0, 2 * stats.norm.sf(b)))


def paired_accuracy(a: Sequence[bool], b: Sequence[bool], level: float = LEVEL) -> Comparison:
    """Accuracy of ``a`` minus ``b`` on the same questions: Newcombe's method 10 interval (hybrid
    Wilson score with the pairs' correlation), and the p-value that inverts it, so significance
    (p < 1 - level) and an interval excluding 0 always agree. In simulation it covers 93-97 %
    where the discordant-share interval covered 99-100 % and disagreed with exact McNemar
    (issue 28). Only discordant questions (``a_only``, ``b_only``) move the difference."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    n = int(a.size)
    n11, n10 = int(np.count_nonzero(a & b)), int(np.count_nonzero(a & ~b))
    n01 = int(np.count_nonzero(b & ~a))
    n00 = n - n11 - n10 - n01
    method = "newcombe paired (method 10)"
    details = {"a_only": n10, "b_only": n01, "a_acc": float(a.mean()) if n else None,
               "b_acc": float(b.mean()) if n else None}
    if n == 0:
        return Comparison(diff=Estimate(value=None, n=0, method=method), significant=False,
                          method=method, n=0, details=details)
    z = stats.norm.isf((1 - level) / 2)
    lo, hi = (float(x) for x in newcombe_paired(n11, n10, n01, n00, z))
    p = newcombe_p_value(n11, n10, n01, n00)
    significant = lo > 0 or hi < 0
    est = Estimate(value=(n10 - n01) / n, lo=lo, hi=hi, n=n, level=level, method=method)
    return Comparison(diff=est, p_value=p, significant=significant, method=method, n=n,
                      n_to_resolve=None if significant else _paired_n_to_resolve((n11, n10, n01, n00), 1 - level),
                      details=details)


def _paired_n_to_resolve(cells: tuple[int, int, int, int], alpha: float) -> int | None:
    """Questions needed for the same four shares of the 2x2 table to reach p < alpha, i.e. for
    the (1 - alpha) interval to exclude 0 (None: no difference, or not within 10,000x the data).
    One vectorized pass over a fine grid of scale factors (0.5 % apart)."""
    if cells[1] == cells[2]:
        return None
    n = sum(cells)
    scales = np.geomspace(1.0, 1e4, 1850)
    scaled = [np.round(c * scales) for c in cells]
    lo, hi = newcombe_paired(*scaled, stats.norm.isf(alpha / 2))
    resolved = (lo > 0) | (hi < 0)
    if not resolved.any():
        return None
    return int(math.ceil(n * scales[int(np.argmax(resolved))]))


def power_paired_accuracy(n: int, diff: float, discordant: float, alpha: float = ALPHA,
                          reps: int = 4000, seed: int = 0) -> float:
    """Probability that ``paired_accuracy`` at level alpha separates two variants whose accuracy
    differs by ``diff`` on ``n`` questions, when they disagree on a share ``discordant`` of the
    questions (Monte Carlo over the 2x2 table, the real interval; accuracies around 1/2)."""
    if n <= 0 or discordant <= abs(diff):
        return float("nan") if n > 0 else 0.0
    p10, p01 = (discordant + diff) / 2, (discordant - diff) / 2
    rest = (1 - discordant) / 2
    rng = np.random.default_rng(seed)
    cells = rng.multinomial(n, [rest, p10, p01, rest], size=reps).T
    lo, hi = newcombe_paired(cells[0], cells[1], cells[2], cells[3], stats.norm.isf(alpha / 2))
    return float(np.mean((lo > 0) | (hi < 0)))


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction: which of the family's hypotheses are rejected at family-wise
    error rate ``alpha``, and the adjusted p-values (max over i <= j of (m - i) p_(i), capped at
    1). What statsmodels' ``multipletests(method="holm")`` returns (tests/test_stats.py checks it);
    written out because that call runs ``gc.collect()`` (0.1 s each), which the decision-rule
    benchmark would pay thousands of times."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return [], []
    order = np.argsort(p, kind="stable")
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return [bool(x <= alpha) for x in adjusted], [float(x) for x in adjusted]


def look_alpha(max_looks: int, alpha: float = ALPHA) -> float:
    """The level of each look of a test repeated on pooled data up to ``max_looks`` times
    (Bonferroni over the looks): the chance of any false pass over all looks stays <= alpha.
    A knee probe re-measured while undecided and judged on its pooled requests passed a p99
    sitting exactly at the limit 6.7-6.9 % of the time at 0.05 per look (issue 28)."""
    if max_looks < 1:
        raise ValueError(f"max_looks must be >= 1, got {max_looks}")
    return alpha / max_looks


# --- perplexity ----------------------------------------------------------------------------------

def _clusters(n: int, clusters: Sequence | None) -> tuple[np.ndarray, int]:
    """Each document's cluster index (its source page); None: every document its own."""
    if clusters is None:
        return np.arange(n), n
    if len(clusters) != n:
        raise ValueError(f"clusters name {len(clusters)} documents, the data has {n}")
    _, idx = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    return idx, int(idx.max()) + 1 if n else 0


def _cluster_sums(idx: np.ndarray, k: int, *cols: np.ndarray) -> list[np.ndarray]:
    return [np.bincount(idx, weights=c, minlength=k) for c in cols]


def _cluster_bootstrap(sums: list[np.ndarray], log_stat: Callable, level: float,
                       seed: int) -> tuple[float, float, float]:
    """A statistic on the log scale (log perplexity, log perplexity ratio) resampled over clusters
    (pages): each resample draws whole pages with replacement and sums their documents. Returns
    (lo, hi, p) on the log scale: the estimate +- Student's t (pages - 1 degrees of freedom) times
    the bootstrap standard error (scaled by sqrt(P / (P - 1)), the bootstrap's own bias for a
    mean), and the two-sided p-value of the same t, so p < 1 - level exactly when the interval
    excludes 0. Why not the percentile interval: its tails come from 2,000 resamples, too few for
    the small levels Holm asks of a family of pairs (it dropped an equal variant about twice as
    often as allowed in benchmarks/decision_rule.py), and it undercovers with few pages."""
    k = sums[0].size
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, k, size=(BOOTSTRAP_RESAMPLES, k))
    est = float(log_stat(*(s.sum() for s in sums)))
    boot = log_stat(*(s[draw].sum(axis=1) for s in sums))
    se = float(np.std(boot, ddof=1)) * math.sqrt(k / (k - 1))
    if se == 0 or not math.isfinite(se):
        return est, est, 1.0 if est == 0 else 0.0
    t = stats.t.isf((1 - level) / 2, k - 1)
    p = float(2 * stats.t.sf(abs(est) / se, k - 1))
    return est - t * se, est + t * se, p


def perplexity(loglik: Sequence[float], words: Sequence[float], level: float = LEVEL,
               seed: int = 0, clusters: Sequence | None = None) -> Estimate:
    """Word perplexity exp(-sum(loglik) / sum(words)) over documents (what lm-eval's
    ``word_perplexity`` aggregates), with a bootstrap-t interval over ``clusters`` (each
    document's source page: chunks of one page are correlated, so the page is the unit of
    independence; None: each document is its own page)."""
    ll = np.asarray(loglik, dtype=float)
    w = np.asarray(words, dtype=float)
    n = ll.size
    method = "cluster bootstrap over pages"
    if n == 0 or w.sum() <= 0:
        return Estimate(value=None, n=n, level=level, method=method, note="no documents")
    if not (np.all(np.isfinite(ll)) and np.all(np.isfinite(w))):
        return Estimate(value=None, n=n, level=level, method=method, note="non-finite log-likelihood or word count")
    value = float(np.exp(-ll.sum() / w.sum()))
    idx, k = _clusters(n, clusters)
    if k < 2:
        return Estimate(value=value, n=n, level=level, method=method, note="one page: no interval")
    lo, hi, _ = _cluster_bootstrap(_cluster_sums(idx, k, ll, w), lambda ll, w: -ll / w, level, seed)
    return Estimate(value=value, lo=math.exp(lo), hi=math.exp(hi), n=n, level=level, method=method,
                    note=f"{k} pages" if clusters is not None else None)


def perplexity_change(loglik_a: Sequence[float], loglik_b: Sequence[float], words: Sequence[float],
                      level: float = LEVEL, seed: int = 0, clusters: Sequence | None = None) -> Comparison:
    """a's word perplexity as a % change over b's, on the same documents, with a paired bootstrap
    over ``clusters`` (source pages; None: documents): the log ratio +- t times its bootstrap
    standard error. Significant when the interval excludes 0, which is when its p < 1 - level
    (``_cluster_bootstrap``); the p-value feeds Holm."""
    la, lb, w = (np.asarray(v, dtype=float) for v in (loglik_a, loglik_b, words))
    if not (la.size == lb.size == w.size):
        raise ValueError(f"paired documents differ in length: {la.size}, {lb.size}, {w.size}")
    n = la.size
    method = "paired cluster bootstrap over pages"
    if n == 0 or w.sum() <= 0 or not all(np.all(np.isfinite(x)) for x in (la, lb, w)):
        note = "no documents" if n == 0 or w.sum() <= 0 else "non-finite log-likelihood or word count"
        return Comparison(diff=Estimate(value=None, n=n, method=method, note=note), significant=False,
                          method=method, n=n)

    def log_ratio(la, lb, w):  # log(ppl_a / ppl_b)
        return (lb - la) / w

    value = float(100 * math.expm1(log_ratio(la.sum(), lb.sum(), w.sum())))
    idx, k = _clusters(n, clusters)
    if k < 2:
        return Comparison(diff=Estimate(value=value, n=n, level=level, method=method,
                                        note="one page: no interval"),
                          significant=False, method=method, n=n)
    lo, hi, p = _cluster_bootstrap(_cluster_sums(idx, k, la, lb, w), log_ratio, level, seed)
    significant = lo > 0 or hi < 0
    lo, hi = 100 * math.expm1(lo), 100 * math.expm1(hi)
    return Comparison(diff=Estimate(value=value, lo=lo, hi=hi, n=n, level=level, method=method),
                      p_value=p, significant=significant, method=method, n=n,
                      n_to_resolve=None if significant else n_to_resolve(value, lo, hi, n),
                      details={"pages": k})


def n_to_resolve(value: float, lo: float | None, hi: float | None, n: int) -> int | None:
    """Units needed for an interval of this width to exclude zero at the observed difference
    (width shrinks as 1/sqrt(n)); None for a zero or non-finite difference, or no interval."""
    if lo is None or hi is None or not all(math.isfinite(x) for x in (value, lo, hi)) \
            or value == 0 or hi <= lo:
        return None
    half = (hi - lo) / 2
    return int(math.ceil(n * (half / abs(value)) ** 2))


def power_perplexity_change(change_pct: float, se_log: float, pages: int, alpha: float = ALPHA) -> float:
    """Probability of separating a perplexity change of ``change_pct`` % when the log perplexity
    ratio has standard error ``se_log`` over ``pages`` pages: Student's t with pages - 1 degrees
    of freedom (a normal-theory approximation of the cluster bootstrap)."""
    if pages < 2 or not se_log or not math.isfinite(se_log):
        return 0.0
    delta = abs(math.log1p(change_pct / 100)) / se_log
    t = stats.t.isf(alpha / 2, pages - 1)
    return float(stats.nct.sf(t, pages - 1, delta) + stats.nct.cdf(-t, pages - 1, delta))


def log_ratio_se(loglik_a: Sequence[float], loglik_b: Sequence[float], words: Sequence[float],
                 clusters: Sequence | None = None) -> tuple[float, int]:
    """Standard error of log(perplexity_a / perplexity_b) over pages (the ratio estimator's
    linearization, Cochran 1977 eq. 6.9 with a P/(P-1) factor), and the number of pages."""
    la, lb, w = (np.asarray(v, dtype=float) for v in (loglik_a, loglik_b, words))
    idx, k = _clusters(la.size, clusters)
    if k < 2:
        return float("nan"), k
    d, ws = _cluster_sums(idx, k, lb - la, w)
    r = d.sum() / ws.sum()
    return float(math.sqrt(k / (k - 1) * np.sum((d - r * ws) ** 2)) / ws.sum()), k


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
