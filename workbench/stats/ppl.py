"""Perplexity and its change to another variant on the same documents: a cluster bootstrap over
source pages (chunks of one page are not independent), Student's t over pages - 1 degrees of
freedom, the power to see a change, and how many units would resolve a difference."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from workbench.stats.core import ALPHA, BOOTSTRAP_RESAMPLES, LEVEL, Comparison, Estimate

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
