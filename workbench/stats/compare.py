"""Comparisons: accuracy on the same questions (Newcombe's paired interval and its p-value, the
power to see a difference), two latency samples (Mann-Whitney U), and a family of tests (Holm's
correction; Bonferroni over the looks of a test repeated on pooled data)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from workbench.stats.core import ALPHA, LEVEL, Comparison, Estimate, percentile

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


# --- two latency samples -------------------------------------------------------------------------

def ratio_bounds(a: Estimate, b: Estimate) -> Estimate:
    """a / b with the bounds its two intervals allow, [a.lo / b.hi, a.hi / b.lo]: where both
    intervals hold (probability >= 1 - 2 (1 - level) by Bonferroni, whatever their dependence) the
    ratio is inside. For two estimates with nothing to pair them over (one block each); a side
    stays None where either interval is open there or the divisor's bound is not positive."""
    value = a.value / b.value if a.value is not None and b.value else None
    lo = a.lo / b.hi if a.lo is not None and b.hi else None
    hi = a.hi / b.lo if a.hi is not None and b.lo is not None and b.lo > 0 else None
    return Estimate(value=value, lo=lo, hi=hi, n=min(a.n, b.n), level=a.level,
                    method="ratio bounds from the two intervals",
                    note=f"both {a.level:.0%} intervals hold with probability >= {1 - 2 * (1 - a.level):.0%}")


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
    p = float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue) if x.size and y.size else None
    significant = p is not None and p < 1 - level
    return Comparison(diff=ratio_bounds(mx, my).model_copy(update={"n": int(x.size + y.size),
                                                                   "method": "ratio of medians"}),
                      p_value=p, significant=significant, method=method, n=int(x.size + y.size),
                      details={"a_median": mx.value, "b_median": my.value, "a_n": int(x.size),
                               "b_n": int(y.size)})
