"""Two arms, and a control over a run, compared at the level of blocks (repeats or windows), never
of requests: requests of one step are autocorrelated (``timestats``), and a host that drifts
between steps moves every request of a step together.

- ``compare_arms``: two arms on per-block summaries (e.g. each repeat's median TTFT): paired t on
  the log-ratios when the arms ran in the same blocks (a block's drift cancels), else Welch's t
  on the logs; the ratio of geometric means with its interval and a p-value.
- ``drift_spread``: a control arm's level in every block: Cochran's Q for "any drift" (weights
  from each block's own interval), the between-block SD of log levels (DerSimonian-Laird) with a
  Q-profile interval (Viechtbauer 2007), the max/min ratio, and whether it exceeds a tolerance.
- ``ratio_of``: two independent estimates with their intervals (two steps measured apart).

    python -m pytest tests/test_timestats.py
    python benchmarks/loadtest_stats.py      # false positives on null data, old vs new
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import optimize
from scipy import stats as ss

from workbench.stats import LEVEL, Comparison, Estimate, Verdict


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
        # qgen falls towards 0 as t2 grows; widen the bracket until it straddles the target
        # (blocks with tiny intervals put the root far above var(y): brentq needs a sign change)
        hi_t2 = float(np.var(y) * 100 + 1)
        for _ in range(60):
            if qgen(hi_t2) <= target:
                break
            hi_t2 *= 10
        else:
            return hi_t2
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
