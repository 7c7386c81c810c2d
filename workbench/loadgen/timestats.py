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
  downward bias in the variance that costs coverage (``benchmarks/loadtest_stats.py``).
- ``percentile``: the order-statistic interval with the effective sample size n / τ of the
  indicator 1{x <= q_p} (τ at least the median indicator's, whose estimate is stable); τ = 1
  gives exactly ``stats.percentiles``. Too few effective samples for a p99 gives no upper bound.
- ``share``: Wilson's interval at the effective sample size (goodput, success).
- ``mean``: Student's t with the block variance.
  Each widens by (t_df / z)^2, df from the number of blocks (overlapping batch means:
  1.5 (n/l - 1)), for the noise of τ's own estimate.
- ``circular_block_bootstrap``: seeded, vectorized resampling for any statistic (used where no
  closed form exists, and as the reference the tests hold the closed forms to).
- ``within``/``at_least``: SLO tests from the interval (pass when all of it is on the right side).
- ``compare_arms``: two arms on per-block (per-repeat, per-window) summaries: paired t on the
  log-ratios when the arms ran in the same blocks, else Welch t on the logs.
- ``drift_spread``: a control arm's spread across the run's blocks: Cochran's Q for "any
  drift", the between-block SD of log levels with a Q-profile interval, max/min ratio.

    python -m pytest tests/test_timestats.py
    python benchmarks/loadtest_stats.py      # coverage and false positives, old vs new
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import optimize
from scipy import stats as ss

from workbench.stats import ALPHA, LEVEL, Comparison, Estimate, Verdict, _f, min_samples_for_upper_bound

BLOCK_SCALE = 2.0  # x the Politis-White AR(1) plug-in length; why: module docstring
MIN_BLOCKS = 5  # a block is at most n / 5 requests: fewer blocks leave τ unestimable
# Below this many values the lag-1 autocorrelation is noise (its SE ~ 1/sqrt(n) = 0.18 at 30):
# the series is read as independent, and the interval's note says so.
MIN_SERIES = 30
BOOTSTRAP_RESAMPLES = 2000
BATCHES = 10  # batch means of a mean: t with 9 df (coverage 0.92-0.94 in the benchmark, the
# CBB variance 0.90-0.93: its estimate moves with the mean on skewed data)


def lag1(x: np.ndarray) -> float:
    """Lag-1 autocorrelation of the series' ranks (robust to heavy tails); 0 for < 3 values
    or a constant series."""
    x = np.asarray(x, dtype=float)
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

def percentile(x: Sequence[float] | np.ndarray, p: float, level: float = LEVEL,
               segments: Sequence[int] | None = None) -> Estimate:
    """The p-th percentile of time-ordered ``x`` (numpy's linear interpolation) with the
    order-statistic interval at the effective sample size n / τ. ``inf`` (a failed request in an
    SLO series) counts as above every value; NaN is dropped. ``segments``: lengths of separately
    measured parts of ``x`` (repeats), whose blocks never cross from one to the next."""
    x = np.asarray(x, dtype=float)
    keep = ~np.isnan(x)
    parts = _split(keep, segments)
    x = x[keep]
    n = x.size
    if n == 0:
        return Estimate(value=None, n=0, level=level, method="block order statistic", note="no samples")
    s = np.sort(x)
    value = _linear(s, p)
    thr = s[min(n - 1, int(math.floor((n - 1) * p / 100)))]
    t, l, df = _pooled_tau([(x[a:b] <= thr).astype(float) for a, b in parts], block_of=[x[a:b] for a, b in parts])
    t = max(1.0, _inflate_df(t, df, level))
    est = _order_interval(s, p, n, t, level, value, _method("order statistic", l, t))
    few = _few(min(b - a for a, b in parts))
    return est.model_copy(update={"note": "; ".join(x for x in (est.note, few) if x)}) if few else est


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


def _pooled_tau(series: list[np.ndarray], block_of: list[np.ndarray] | None = None) -> tuple[float, int, float]:
    """τ of the mean over every part of a pooled series (parts independent): the parts' τ weighted
    by their length; the largest block length; the parts' summed degrees of freedom."""
    tot, acc, ls, df = 0, 0.0, [], 0.0
    pvar = float(np.concatenate(series).var()) if series else 0.0
    for i, f in enumerate(series):
        l = block_length(block_of[i] if block_of is not None else f)
        t = tau(f, l)
        v = float(f.var())
        # a part's share of the pooled variance of the mean: n_i τ_i var_i (its own spread)
        acc += f.size * (t if math.isfinite(t) else 1.0) * v
        tot += f.size
        ls.append(l)
        df += _df(f.size, l)
    t = acc / (tot * pvar) if tot and pvar > 0 else math.nan
    return t if math.isfinite(t) else 1.0, max(ls, default=1), df


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
    blocks = None if pr is None else [pr[a:b] for a, b in parts]
    t, l, df = _pooled_tau([f[a:b] for a, b in parts], block_of=blocks)
    if pr is not None and np.isfinite(pr).any():
        # at least the latency's median indicator's τ: a share near 0 or 1 changes too rarely to
        # estimate its own (0.90 coverage at ρ = 0.8 without this floor, 0.95 with it)
        med = np.median(pr[np.isfinite(pr)])
        t = max(t, _pooled_tau([(b_ <= med).astype(float) for b_ in blocks], block_of=blocks)[0])
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


# --- two arms, and a control over the run ---------------------------------------------------------

def compare_arms(a: Sequence[float], b: Sequence[float], paired: bool = True,
                 level: float = LEVEL) -> Comparison:
    """``a`` over ``b`` from per-block summaries (e.g. each repeat's median TTFT; positive values):
    the ratio of geometric means with its interval. ``paired``: a[i] and b[i] ran in block i, so the
    block's drift cancels in the log-ratio (paired t); else Welch's t on the logs."""
    x, y = np.log(np.asarray(a, dtype=float)), np.log(np.asarray(b, dtype=float))
    method = "paired t on block log-ratios" if paired else "welch t on block logs"
    if paired and x.size != y.size:
        raise ValueError(f"paired blocks differ in number: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y) if paired else None
    if paired:
        x, y = x[ok], y[ok]
    else:
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    n = int(x.size if paired else min(x.size, y.size))
    details = {"a_blocks": int(x.size), "b_blocks": int(y.size)}
    if n < 2:
        d = float(np.exp(x.mean() - y.mean())) if x.size and y.size else None
        return Comparison(diff=Estimate(value=d, n=n, level=level, method="ratio of geometric means",
                                        note="fewer than 2 blocks: no interval"),
                          significant=False, method=method, n=n, details=details)
    if paired:
        d = x - y
        res = ss.ttest_1samp(d, 0.0)
        est, se, df = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), d.size - 1
    else:
        res = ss.ttest_ind(x, y, equal_var=False)
        est = float(x.mean() - y.mean())
        va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
        se = float(math.sqrt(va + vb))
        df = float((va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))) if se > 0 else 1.0
    q = ss.t.ppf(0.5 + level / 2, df)
    p = float(res.pvalue) if np.isfinite(res.pvalue) else (1.0 if est == 0 else 0.0)
    return Comparison(diff=Estimate(value=math.exp(est), lo=math.exp(est - q * se), hi=math.exp(est + q * se),
                                    n=n, level=level, method="ratio of geometric means"),
                      p_value=p, significant=p < 1 - level, method=method, n=n, details=details)


class Spread(BaseModel):
    """A control arm's level across the run's blocks (``drift_spread``)."""

    model_config = ConfigDict(extra="forbid")

    blocks: int
    tolerance: float  # a share: 0.1 = the control may move 10 % between blocks
    ratio_max_min: float | None = None  # highest over lowest block level
    sd_log: Estimate | None = None  # between-block SD of log levels (DerSimonian-Laird), Q-profile interval
    q: float | None = None  # Cochran's Q
    p_value: float | None = None  # of "no drift" (Q ~ chi2 with blocks - 1 df)
    drifted: bool = False  # Q significant and ratio_max_min - 1 > tolerance
    exceeds: Verdict = Verdict.undecided  # the between-block SD vs the tolerance's (log(1 + tol) / 2)
    method: str = "cochran q on block log levels; between-block sd by q-profile"


def drift_spread(values: Sequence[float], lo: Sequence[float | None], hi: Sequence[float | None],
                 tolerance: float = 0.1, level: float = LEVEL) -> Spread:
    """A control's level in each block (``values``, positive, e.g. its median TTFT) with each
    block's own interval: is the spread across blocks more than sampling noise, and more than
    ``tolerance`` (a share: 0.1 = 10 %)? Cochran's Q on the log levels (weights from each block's
    interval) tests "no drift"; the between-block SD of log levels gets a Q-profile interval
    (Viechtbauer 2007); ``drifted`` when Q is significant and max/min - 1 exceeds the tolerance."""
    y = np.log(np.asarray(values, dtype=float))
    z = ss.norm.ppf(0.5 + level / 2)
    se = np.array([(math.log(h) - math.log(l_)) / (2 * z) if l_ and h and l_ > 0 else math.nan
                   for l_, h in zip(lo, hi)], dtype=float)
    keep = np.isfinite(y) & np.isfinite(se)
    y, se = y[keep], se[keep]
    k = int(y.size)
    if k < 2:
        return Spread(blocks=k, tolerance=tolerance)
    se = np.maximum(se, 1e-9)  # a block without spread still has some sampling error
    w = 1 / se**2
    mu = float((w * y).sum() / w.sum())
    q = float((w * (y - mu) ** 2).sum())
    p = float(ss.chi2.sf(q, k - 1))
    ratio = float(math.exp(y.max() - y.min()))

    def qgen(t2: float) -> float:
        ww = 1 / (se**2 + t2)
        m = (ww * y).sum() / ww.sum()
        return float((ww * (y - m) ** 2).sum())

    def root(target: float) -> float:
        if qgen(0.0) <= target:
            return 0.0
        hi_t2 = float(np.var(y) * 100 + 1)
        return float(optimize.brentq(lambda t2: qgen(t2) - target, 0.0, hi_t2))

    a = (1 - level) / 2
    t2_lo, t2_hi = root(ss.chi2.ppf(1 - a, k - 1)), root(ss.chi2.ppf(a, k - 1))
    c = (w.sum() - (w**2).sum() / w.sum())
    t2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0  # DerSimonian-Laird
    drifted = p < 1 - level and ratio - 1 > tolerance
    tol_sd = math.log(1 + tolerance) / 2  # sd of two levels tolerance apart
    exceeds = (Verdict.passed if math.sqrt(t2_lo) > tol_sd else
               Verdict.failed if math.sqrt(t2_hi) <= tol_sd else Verdict.undecided)
    sd = Estimate(value=math.sqrt(t2), lo=math.sqrt(t2_lo), hi=math.sqrt(t2_hi), n=k, level=level,
                  method="dersimonian-laird, q-profile interval")
    return Spread(blocks=k, tolerance=tolerance, ratio_max_min=ratio, sd_log=sd, q=q, p_value=p,
                  drifted=bool(drifted), exceeds=exceeds)


def ratio_of(a: Estimate, b: Estimate, level: float = LEVEL) -> Comparison:
    """a / b for two independent estimates with their own intervals (two steps measured apart,
    e.g. a drift control's start and end): log-normal approximation, each log standard error from
    its interval; a z-test on the log ratio."""
    method = "ratio of block-bootstrap estimates"
    z = ss.norm.ppf(0.5 + level / 2)
    if not (a.value and b.value and a.value > 0 and b.value > 0):
        return Comparison(diff=Estimate(value=None, n=a.n + b.n, method=method), significant=False,
                          method=method, n=a.n + b.n)

    def se(e: Estimate) -> float | None:
        if e.lo is None or e.hi is None or e.lo <= 0:
            return None
        return (math.log(e.hi) - math.log(e.lo)) / (2 * z)

    d = math.log(a.value) - math.log(b.value)
    sa, sb = se(a), se(b)
    details = {"a": a.value, "b": b.value, "a_n": a.n, "b_n": b.n}
    if sa is None or sb is None:
        return Comparison(diff=Estimate(value=math.exp(d), n=a.n + b.n, level=level, method=method,
                                        note="an estimate without a bounded interval: no test"),
                          significant=False, method=method, n=a.n + b.n, details=details)
    s_ = math.hypot(sa, sb)
    p = float(2 * ss.norm.sf(abs(d) / s_)) if s_ > 0 else (1.0 if d == 0 else 0.0)
    return Comparison(diff=Estimate(value=math.exp(d), lo=math.exp(d - z * s_), hi=math.exp(d + z * s_),
                                    n=a.n + b.n, level=level, method=method),
                      p_value=p, significant=p < 1 - level, method=method, n=a.n + b.n, details=details)
