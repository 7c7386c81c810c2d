"""Intervals and tests for time-ordered load-test records, whose requests are not independent.

Requests of one step share a queue, a batch and a host: in the H200 records the lag-1
autocorrelation of TTFT is 0.4-0.6 and of E2EL 0.6-0.8 (issue 27). Intervals that treat each
request as a sample then cover far less than 95 %. Here the unit of replication is a block of
consecutive requests, or a repeat:

- ``tau``: the variance inflation of a mean (the integrated autocorrelation time, 1 for
  independent samples), from the circular block bootstrap (Politis & Romano 1992). Its variance
  of the mean has a closed form (the mean of the n circular blocks' squared centred sums), so
  no resampling is needed and the answer does not depend on a seed.
- ``block_length``: the AR(1) plug-in of Politis & White's (2004) automatic rule,
  l = (2ρ/(1-ρ²))^(2/3) n^(1/3), doubled (``BLOCK_SCALE``): the MSE-optimal length leaves a
  downward bias in the variance that costs coverage: a p50 over 400 requests at ρ = 0.8 covered
  0.91 with the plug-in length, 0.93-0.95 doubled, and tripling changed little (500-1,000
  simulated steps, the processes of ``benchmarks/loadtest_stats.py``).
- ``percentiles``: the order-statistic interval at the effective sample size n / τ, τ of the
  indicator 1{x <= q_p}; τ = 1 gives exactly ``stats.percentiles``. Too few effective samples
  for a p99 (368) gives no upper bound, and the note says so.
- ``share``: Wilson's interval at the effective sample size (goodput, success), τ at least the
  latency's median indicator's (a share near 1 changes too rarely to estimate its own).
  Both widen τ by (t_df / z)^2, df from the number of blocks (overlapping batch means:
  1.5 (n/l - 1)), for the noise of τ's own estimate.
- ``mean``: batch means (10 consecutive batches, Student's t with 9 df).
- ``circular_block_bootstrap``: seeded, vectorized resampling for any statistic (used where no
  closed form exists, and as the reference the tests hold the closed forms to).
- ``within``/``at_least``: SLO tests from the interval (pass when all of it is on the right side).

Comparisons between arms and a control's drift, at the level of blocks: ``timecompare``.
The ``arch`` package has these bootstraps, but needs statsmodels, which the environment lacks:
the few lines here are checked against known cases in the tests instead.

    python -m pytest tests/test_timestats.py
    python benchmarks/loadtest_stats.py      # coverage and false positives, old vs new
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats as ss

from workbench.stats import LEVEL, Estimate, Verdict, min_samples_for_upper_bound

BLOCK_SCALE = 2.0  # x the Politis-White AR(1) plug-in length; why: module docstring
MIN_BLOCKS = 5  # a block is at most n / 5 requests: fewer blocks leave τ unestimable
# Below this many values the lag-1 autocorrelation is noise (its SE ~ 1/sqrt(n) = 0.18 at 30):
# the series is read as independent, and the interval's note says so.
MIN_SERIES = 30
LAG1_MAX = 200_000  # the lag-1 estimate reads at most this many values (an ITL series can hold 10^7)
BOOTSTRAP_RESAMPLES = 2000
BATCHES = 10  # batch means of a mean: t with 9 df (coverage 0.92-0.95 in the benchmark; the
# block-variance t interval covered 0.90-0.93: its variance estimate moves with the mean on skewed data)


def lag1(x: np.ndarray) -> float:
    """Lag-1 autocorrelation of the series' ranks (robust to heavy tails); 0 for < 3 values
    or a constant series."""
    x = np.asarray(x, dtype=float)[:LAG1_MAX]
    if x.size < 3:
        return 0.0
    r = ss.rankdata(np.round(x, 9))  # float noise (1e-13 of a ms) is a tie, not an order
    r = r - r.mean()
    den = float(r @ r)
    return 0.0 if den == 0 else float(r[:-1] @ r[1:] / den)


def block_length(x: np.ndarray, rho: float | None = None) -> int:
    """Block length for the series ``x``: the Politis-White AR(1) plug-in, x ``BLOCK_SCALE``,
    between 1 and n / ``MIN_BLOCKS``."""
    n = int(np.asarray(x).size)
    if n < MIN_SERIES:
        return 1
    r = min(max(lag1(x) if rho is None else rho, 0.0), 0.95)
    if r == 0:
        return 1
    raw = BLOCK_SCALE * (2 * r / (1 - r * r)) ** (2 / 3) * n ** (1 / 3)
    return int(min(max(1, math.ceil(raw)), n // MIN_BLOCKS))


def tau(x: np.ndarray, length: int) -> float:
    """Variance inflation of the mean of ``x`` (n Var(mean) / Var(x)) from the circular block
    bootstrap with blocks of ``length``: its variance of the mean in closed form. >= 0; nan for
    a constant series."""
    x = np.asarray(x, dtype=float)
    n, l = x.size, int(length)
    var = float(x.var())
    if n == 0 or var == 0:
        return math.nan
    if l <= 1:
        return 1.0
    c = x - x.mean()
    cs = np.concatenate([[0.0], np.cumsum(np.concatenate([c, c[: l - 1]]))])
    sums = cs[l: l + n] - cs[:n]  # the n circular blocks' sums
    # x n / (n - l): centring on the sample mean takes l / n of it away (exact for independent
    # samples; Meketon & Schmeiser's overlapping batch means carry the same factor)
    return float(np.mean(sums * sums) / (l * var) * n / max(n - l, 1))


def _df(n: int, length: int) -> float:
    """Degrees of freedom of a block variance: overlapping batch means' 1.5 (b - 1)."""
    if length <= 1:
        return math.inf
    return max(1.0, 1.5 * (n / length - 1))


def _inflate_df(t: float, df: float, level: float) -> float:
    """τ x (t_df / z)^2: the interval widens for the noise of τ's own estimate."""
    if not math.isfinite(df):
        return t
    z = ss.norm.ppf(0.5 + level / 2)
    return t * (ss.t.ppf(0.5 + level / 2, df) / z) ** 2


def _method(what: str, length: int, t: float) -> str:
    return f"{what}, circular block bootstrap (block {length}, tau {t:.2f})"


def _few(n: int) -> str | None:
    return (f"{n} values, fewer than {MIN_SERIES}: their dependence is not estimated, read as if "
            "independent") if n < MIN_SERIES else None


# --- a percentile --------------------------------------------------------------------------------

def percentiles(x: Sequence[float] | np.ndarray, ps: Sequence[float], level: float = LEVEL,
                segments: Sequence[int] | None = None) -> dict[float, Estimate]:
    """The p-th percentiles of time-ordered ``x`` (numpy's linear interpolation) with the
    order-statistic interval at the effective sample size n / τ, τ of the indicator
    1{x <= the percentile}. ``inf`` (a failed request in an SLO series) counts as above every
    value; NaN is dropped. ``segments``: lengths of separately measured parts of ``x`` (repeats),
    whose blocks never cross from one to the next. One sort and one block length per part serve
    every percentile."""
    x = np.asarray(x, dtype=float)
    keep = ~np.isnan(x)
    parts = _split(keep, segments)
    x = x[keep]
    n = x.size
    if n == 0:
        return {p: Estimate(value=None, n=0, level=level, method="block order statistic", note="no samples")
                for p in ps}
    s = np.sort(x)
    lengths = [block_length(x[a:b]) for a, b in parts]
    few = _few(min(b - a for a, b in parts))
    out = {}
    for p in ps:
        thr = s[min(n - 1, int(math.floor((n - 1) * p / 100)))]
        t, df = _pooled_tau([(x[a:b] <= thr).astype(float) for a, b in parts], lengths)
        t = max(1.0, _inflate_df(t, df, level))
        est = _order_interval(s, p, n, t, level, _linear(s, p), _method("order statistic", max(lengths), t))
        out[p] = est.model_copy(update={"note": "; ".join(v for v in (est.note, few) if v)}) if few else est
    return out


def percentile(x: Sequence[float] | np.ndarray, p: float, level: float = LEVEL,
               segments: Sequence[int] | None = None) -> Estimate:
    """One percentile: ``percentiles``."""
    return percentiles(x, [p], level, segments)[p]


def _linear(s: np.ndarray, p: float) -> float:
    """numpy's "linear" percentile of sorted ``s``, with inf where it lands on one."""
    pos = (s.size - 1) * p / 100
    i = int(math.floor(pos))
    j = min(i + 1, s.size - 1)
    frac = pos - i
    return float(s[i]) if frac == 0 or s[i] == s[j] else float(s[i] + (s[j] - s[i]) * frac)


def _split(keep: np.ndarray, segments: Sequence[int] | None) -> list[tuple[int, int]]:
    """[start, end) of each segment in the kept values."""
    if segments is None:
        return [(0, int(keep.sum()))]
    if sum(segments) != keep.size:
        raise ValueError(f"segments sum to {sum(segments)}, the series has {keep.size} values")
    bounds = np.concatenate([[0], np.cumsum(keep)])[np.concatenate([[0], np.cumsum(segments)]).astype(int)]
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _pooled_tau(series: list[np.ndarray], lengths: list[int]) -> tuple[float, float]:
    """τ of the mean over every part of a pooled series (parts independent, blocks of
    ``lengths``): the parts' τ weighted by their share of the variance; and the parts' summed
    degrees of freedom."""
    tot, acc, df = 0, 0.0, 0.0
    pvar = float(np.concatenate(series).var()) if series else 0.0
    for f, l in zip(series, lengths):
        t = tau(f, l)
        # a part's share of the pooled variance of the mean: n_i τ_i var_i (its own spread)
        acc += f.size * (t if math.isfinite(t) else 1.0) * float(f.var())
        tot += f.size
        df += _df(f.size, l)
    t = acc / (tot * pvar) if tot and pvar > 0 else math.nan
    return (t if math.isfinite(t) else 1.0), df


def _order_interval(s: np.ndarray, p: float, n: int, t: float, level: float, value: float,
                    method: str) -> Estimate:
    a = (1 - level) / 2
    m = max(1, int(round(n / t)))  # effective sample size
    dist = ss.binom(m, p / 100)
    lo_e = int(dist.ppf(a))
    if lo_e >= 1 and dist.cdf(lo_e - 1) > a:
        lo_e -= 1
    hi_e = int(dist.isf(a)) + 1
    lo_rank = int(math.floor(lo_e * n / m)) if lo_e >= 1 else 0  # scaled back to n samples
    hi_rank = int(math.ceil(hi_e * n / m)) if hi_e <= m else n + 1
    note = None
    if hi_rank > n:
        need = min_samples_for_upper_bound(p, level) if p < 100 else None
        note = (f"{n} samples ({m} effective, tau {t:.2f}) cannot bound p{p:g} from above"
                + (f" (needs >= {need} effective)" if need else "")
                + f": read it as at least {float(s[lo_rank - 1]) if lo_rank else float(s[0]):.4g}")
    return Estimate(value=value, lo=float(s[lo_rank - 1]) if lo_rank >= 1 else None,
                    hi=float(s[hi_rank - 1]) if hi_rank <= n else None, n=n, level=level,
                    method=method, note=note)


# --- a share and a mean --------------------------------------------------------------------------

def share(flags: Sequence[bool] | np.ndarray, level: float = LEVEL, proxy: np.ndarray | None = None,
          segments: Sequence[int] | None = None) -> Estimate:
    """The share of True in time-ordered ``flags`` (goodput, success) with Wilson's interval at
    the effective sample size. ``proxy``: the latency series behind the flags (same length): its
    lag-1 autocorrelation sets the block length, and its median indicator's τ is a floor for the
    flags' own (all-good flags carry no estimate of their dependence). ``segments``: as in
    ``percentile``."""
    f = np.asarray(flags, dtype=float)
    n = f.size
    if n == 0:
        return Estimate(value=None, n=0, level=level, method="block wilson", note="no samples")
    parts = _split(np.ones(n, bool), segments)
    pr = None if proxy is None or np.asarray(proxy).size != n else np.asarray(proxy, dtype=float)
    lengths = [block_length(f[a:b] if pr is None else pr[a:b]) for a, b in parts]
    t, df = _pooled_tau([f[a:b] for a, b in parts], lengths)
    if pr is not None and np.isfinite(pr).any():
        # at least the latency's median indicator's τ: a share near 0 or 1 changes too rarely to
        # estimate its own (0.90 coverage at ρ = 0.8 without this floor, 0.95 with it)
        med = np.median(pr[np.isfinite(pr)])
        t = max(t, _pooled_tau([(pr[a:b] <= med).astype(float) for a, b in parts], lengths)[0])
    l = max(lengths)
    t = max(1.0, _inflate_df(t, df, level))
    k = float(f.sum())
    m = n / t
    z = ss.norm.ppf(0.5 + level / 2)
    ph = k / n
    centre = (ph + z * z / (2 * m)) / (1 + z * z / m)
    half = z / (1 + z * z / m) * math.sqrt(ph * (1 - ph) / m + z * z / (4 * m * m))
    lo, hi = (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
    return Estimate(value=ph, lo=lo, hi=hi, n=n, level=level,
                    method=_method("wilson", l, t), note=_few(min(b - a for a, b in parts)))


def mean(x: Sequence[float] | np.ndarray, level: float = LEVEL, batches: int = BATCHES,
         segments: Sequence[int] | None = None) -> Estimate:
    """The mean of time-ordered ``x`` with batch means: ``batches`` consecutive batches (split over
    the ``segments``, never across one's end), Student's t over their means; fewer than 2 values
    a batch: over the values, as if independent."""
    x = np.asarray(x, dtype=float)
    keep = np.isfinite(x)
    parts = _split(keep, segments)
    x = x[keep]
    n = x.size
    if n == 0:
        return Estimate(value=None, n=0, level=level, method="batch means t", note="no samples")
    m = float(x.mean())
    if n < 2:
        return Estimate(value=m, n=n, level=level, method="t", note="one sample: no interval")
    per = max(2, -(-batches // len(parts)))
    if all(b - a >= 2 * per for a, b in parts):
        units = np.array([c.mean() for a, b in parts for c in np.array_split(x[a:b], per)])
        method, note = f"batch means t ({units.size} batches)", None
    else:
        units, method, note = x, "t", f"{n} samples, too few for {batches} batches: read as independent"
    # batches differ by at most one value: their mean is the mean's to within rounding
    half = float(ss.t.ppf(0.5 + level / 2, units.size - 1) * units.std(ddof=1) / math.sqrt(units.size))
    return Estimate(value=m, lo=m - half, hi=m + half, n=n, level=level, method=method, note=note)


def circular_block_bootstrap(x: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], length: int,
                             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                             level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of ``statistic`` (applied along axis 1 of a (resamples, n) array) over
    circular block bootstrap resamples of time-ordered ``x`` (Politis & Romano 1992): blocks of
    ``length`` consecutive values from uniform random starts, wrapping at the end."""
    x = np.asarray(x)
    n, l = x.size, max(1, int(length))
    b = -(-n // l)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(resamples, b), dtype=np.int64)
    idx = (starts[:, :, None] + np.arange(l)).reshape(resamples, b * l)[:, :n] % n
    reps = statistic(x[idx])
    a = (1 - level) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return float(lo), float(hi)


# --- SLO tests -----------------------------------------------------------------------------------

def within(est: Estimate, limit: float) -> Verdict:
    """Is the quantity <= ``limit``? pass when the interval is all at or below it, fail when all
    above it, else undecided (an unbounded upper side never passes)."""
    if est.value is None:
        return Verdict.undecided
    if est.hi is not None and est.hi <= limit:
        return Verdict.passed
    if est.lo is not None and est.lo > limit:
        return Verdict.failed
    return Verdict.undecided


def at_least(est: Estimate, floor: float) -> Verdict:
    """Is the share >= ``floor``? pass when the interval is all at or above it, fail when all below."""
    if est.value is None:
        return Verdict.undecided
    if floor <= 0:
        return Verdict.passed
    if est.lo is not None and est.lo >= floor:
        return Verdict.passed
    if est.hi is not None and est.hi < floor:
        return Verdict.failed
    return Verdict.undecided
