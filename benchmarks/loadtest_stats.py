"""Do the load test's 95 % intervals cover 95 % when requests are autocorrelated? Old (per-request:
order statistic, Wilson, t, Mann-Whitney) against new (``workbench.loadgen.timestats``: blocks of
requests, repeats as the unit for comparisons and drift), side by side on the same simulated data.

Simulated latencies, one step = 400 requests in send order (a GPU step at low load; the H200
records show lag-1 autocorrelation 0.4-0.6 for TTFT and 0.6-0.8 for E2EL):
- ``lognormal``: AR(1) on log latency, z_t = ρ z_{t-1} + sqrt(1 - ρ²) e_t, e ~ N(0, 1),
  latency = exp(0.5 z) (a lognormal of σ 0.5);
- ``heavy``: the same AR(1) with Student-t(5) shocks (scaled to unit variance), latency =
  20 (1 + |z|)²: a heavy right tail, and shocks that persist (clustered spikes).
True percentiles and means come from 5 million values of the same process.

Reported, for ρ = 0, 0.5, 0.8, each over ``--reps`` replications (1,000: a 95 % Monte-Carlo
half-width of 1.4 points on a coverage of 95 %):
- coverage of p50, p99, goodput (the share under the true p95: 0.95) and the mean of one step;
- coverage of the ratio of two arms' median latency (arm a = 1.2 x arm b), each arm measured in
  5 repeats of 400 requests (the repeats are the blocks of a counterbalanced run);
- false positives on null data: the speed comparison (equal arms) and the drift check (a control
  that does not move, measured in 5 blocks; old: first against last, Mann-Whitney and a 10 %
  tolerance; new: ``drift_spread`` over the 5 blocks, and the new first/last ``drift_check``).
Also the time of a p99 interval over 10,000 requests.

    flock /tmp/wb-heavy.lock python benchmarks/loadtest_stats.py     # ~5 min on one core
    python benchmarks/loadtest_stats.py --reps 200                    # a quick look
Writes results/benchmarks/loadtest_stats.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
from scipy import signal

from workbench import stats
from workbench.loadgen import timecompare as tc
from workbench.loadgen import timestats as ts
from workbench.reports import package_versions

log = logging.getLogger("loadtest_stats")
OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"
N = 400  # requests per step
REPEATS = 5  # blocks per arm in the two-arm and drift scenarios
RATIO = 1.2  # arm a over arm b in the coverage scenario
TOLERANCE = 0.1  # the drift tolerance (loadtest.drift_tolerance's default)
RHOS = (0.0, 0.5, 0.8)
PROCESSES = ("lognormal", "heavy")


def simulate(rng: np.random.Generator, reps: int, n: int, rho: float, process: str, burn: int = 300) -> np.ndarray:
    """(reps, n) latencies, each row a stationary series in send order."""
    if process == "heavy":
        e = rng.standard_t(5, size=(reps, n + burn)) / np.sqrt(5 / 3)
    else:
        e = rng.standard_normal((reps, n + burn))
    z = signal.lfilter([np.sqrt(1 - rho**2)], [1, -rho], e, axis=1)[:, burn:]
    return 20 * (1 + np.abs(z)) ** 2 if process == "heavy" else np.exp(0.5 * z)


def truth(rho: float, process: str) -> dict[str, float]:
    x = simulate(np.random.default_rng(12345), 50, 100_000, rho, process).ravel()
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(x.mean())}


def covers(e: stats.Estimate, true: float) -> bool:
    lo = -np.inf if e.lo is None else e.lo
    hi = np.inf if e.hi is None else e.hi
    return bool(lo <= true <= hi)


def one_scenario(process: str, rho: float, reps: int, seed: int) -> dict:
    tr = truth(rho, process)
    rng = np.random.default_rng(seed)
    c = {k: 0 for k in ("p50_old", "p50_new", "p99_old", "p99_new", "p99_new_unbounded", "p99_old_unbounded",
                        "goodput_old", "goodput_new", "mean_old", "mean_new", "ratio_old", "ratio_new",
                        "speed_fp_old", "speed_fp_new", "drift_fp_old", "drift_fp_new", "drift_fp_new_first_last")}
    t0 = time.perf_counter()
    for i in range(reps):
        x = simulate(rng, 1, N, rho, process)[0]
        o = stats.percentiles(x, [50, 99])
        c["p50_old"] += covers(o[50], tr["p50"])
        c["p99_old"] += covers(o[99], tr["p99"])
        c["p99_old_unbounded"] += o[99].hi is None
        n50, n99 = ts.percentile(x, 50), ts.percentile(x, 99)
        c["p50_new"] += covers(n50, tr["p50"])
        c["p99_new"] += covers(n99, tr["p99"])
        c["p99_new_unbounded"] += n99.hi is None
        good = x <= tr["p95"]
        c["goodput_old"] += covers(stats.proportion(int(good.sum()), N), 0.95)
        c["goodput_new"] += covers(ts.share(good, proxy=x), 0.95)
        c["mean_old"] += covers(stats.mean(x), tr["mean"])
        c["mean_new"] += covers(ts.mean(x), tr["mean"])
        # two arms, each in REPEATS blocks of N requests (arm a = RATIO x arm b)
        a = RATIO * simulate(rng, REPEATS, N, rho, process)
        b = simulate(rng, REPEATS, N, rho, process)
        b0 = simulate(rng, REPEATS, N, rho, process)  # an arm equal to a / RATIO: the null
        old = stats.compare_samples(a.ravel(), b.ravel())
        c["ratio_old"] += covers(old.diff, RATIO)
        med = lambda arr: [ts.percentile(r, 50) for r in arr]  # noqa: E731
        ma, mb, m0 = med(a), med(b), med(b0)
        new = tc.compare_arms([e.value for e in ma], [e.value for e in mb])
        c["ratio_new"] += covers(new.diff, RATIO)
        c["speed_fp_old"] += stats.compare_samples(a.ravel() / RATIO, b0.ravel()).significant
        c["speed_fp_new"] += tc.compare_arms([e.value / RATIO for e in ma], [e.value for e in m0]).significant
        # drift on null data: the control in REPEATS blocks, no real change (b0's rows)
        first, last = stats.compare_samples(b0[-1], b0[0]), None
        c["drift_fp_old"] += first.significant and abs(first.diff.value - 1) > TOLERANCE
        sp = tc.drift_spread([e.value for e in m0], [e.lo for e in m0], [e.hi for e in m0], tolerance=TOLERANCE)
        c["drift_fp_new"] += sp.drifted
        last = tc.ratio_of(m0[-1], m0[0])
        c["drift_fp_new_first_last"] += last.significant and abs(last.diff.value - 1) > TOLERANCE
        if (i + 1) % max(1, reps // 4) == 0:
            log.info("  %s rho=%g: %d/%d (%.0f s)", process, rho, i + 1, reps, time.perf_counter() - t0)
    out = {k: v / reps for k, v in c.items()}
    x = simulate(np.random.default_rng(seed), 1, N, rho, process)[0]
    out.update(reps=reps, n=N, repeats=REPEATS, truth=tr, lag1=ts.lag1(x), block_length=ts.block_length(x),
               seconds=time.perf_counter() - t0)
    return out


def speed() -> dict:
    x = simulate(np.random.default_rng(7), 1, 10_000, 0.8, "lognormal")[0]
    ts.percentile(x, 99)
    t0 = time.perf_counter()
    for _ in range(20):
        e = ts.percentile(x, 99)
    per = (time.perf_counter() - t0) / 20
    return {"p99_interval_10k_s": per, "p99_10k": e.model_dump()}


ROWS = [("p50", "p50_old", "p50_new"), ("p99", "p99_old", "p99_new"), ("goodput (0.95)", "goodput_old", "goodput_new"),
        ("mean", "mean_old", "mean_new"), ("ratio of two arms' medians", "ratio_old", "ratio_new")]
FP = [("speed comparison, equal arms", "speed_fp_old", "speed_fp_new"),
      ("drift check, steady control", "drift_fp_old", "drift_fp_new")]


NOTES = """
Reading it (numbers from the 1,000-replication run; Monte-Carlo half-width ±0.014):
- **p50**: 0.95-0.97 new in every cell, where the per-request order statistic falls to 0.81 at
  ρ = 0.5 and 0.61 at ρ = 0.8.
- **p99**: 0.94-0.97 new. 400 requests hold too few effective samples to bound a p99 from above
  once ρ >= 0.5 (a p99 needs 368 independent ones): the new interval then has no upper bound
  (45-93 % of runs, "p99 unbounded"), covers trivially on that side, and an SLO on it stays
  undecided. That is the honest answer: a p99 verdict at such ρ needs more requests or repeats.
- **goodput**: 0.95-0.99 new, over-covering (0.978, 0.989) on the lognormal process at ρ >= 0.5:
  its τ has a floor at the latency's median indicator's (a share near 1 changes too rarely to
  estimate its own dependence; without the floor it covered 0.90 at ρ = 0.8), which is
  conservative where the tail is less dependent than the body (Gaussian dependence).
- **mean**: 0.92-0.95 new (batch means, 10 batches, t with 9 df); short on the heavy-tailed process
  at ρ = 0.8 (0.920): on skewed values a low batch variance goes with a low mean, as for any t
  interval on skewed data. The mean is not an SLO quantity; read its interval as approximate.
- **two arms**: the paired t over 5 repeats' median log-ratios covers 0.95-0.96, and 0.925 on the
  heavy-tailed process at ρ = 0.8 (clustered shocks make a repeat's median log-ratio heavy-tailed,
  and t with 4 df assumes it normal). Per-request Mann-Whitney calls equal arms different in 24 %
  (ρ = 0.5) and 50 % (ρ = 0.8) of runs; the new test in 4.0-5.5 %.
- **drift**: `drift_spread` (Cochran's Q over 5 blocks, each block's median with its block
  interval, and the 10 % tolerance) fires on a steady control in 3.5-6.4 % of runs (0.064 at
  lognormal ρ = 0.5: within Monte-Carlo error of 0.05, above the 0.06 goal as measured; the log
  standard error read off an order-statistic interval is approximate); the old first/last
  Mann-Whitney check fired in 35 % at ρ = 0.8. The new first/last check (`summary.drift_check`,
  2 blocks) stays at 2.0-4.7 %.
"""


def markdown(res: dict) -> str:
    sc = res["scenarios"]
    cols = ROWS + [("p99 unbounded", "p99_old_unbounded", "p99_new_unbounded")]
    lines = ["# Load-test intervals under autocorrelation: coverage and false positives, old vs new", "",
             f"`python benchmarks/loadtest_stats.py`: {res['reps']} replications per cell (95 % Monte-Carlo "
             f"half-width ±{res['mc_halfwidth']:.3f} at 0.95), {N} requests a step, {REPEATS} repeats an arm. "
             "Old: per request (order statistic, Wilson, t; Mann-Whitney on pooled requests). New: "
             "`workbench.loadgen.timestats` (block intervals; repeats as the unit for arms and drift). "
             "Each cell: old / **new**.", "",
             "## Coverage of nominal 95 % intervals (goal 0.93-0.97)", "",
             "| process | ρ | lag-1 | block | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for k, r in sc.items():
        proc, rho = k.split("/")
        lines.append(f"| {proc} | {rho} | {r['lag1']:.2f} | {r['block_length']} | "
                     + " | ".join(f"{r[o]:.3f} / **{r[n]:.3f}**" for _, o, n in cols) + " |")
    lines += ["", "## False positives on null data (goal <= 0.06)", "",
              "| process | ρ | " + " | ".join(c[0] for c in FP) + " | drift, new first/last (2 blocks) |",
              "|---|---|" + "---|" * (len(FP) + 1)]
    for k, r in sc.items():
        proc, rho = k.split("/")
        lines.append(f"| {proc} | {rho} | " + " | ".join(f"{r[o]:.3f} / **{r[n]:.3f}**" for _, o, n in FP)
                     + f" | {r['drift_fp_new_first_last']:.3f} |")
    lines += ["", f"A p99 interval over 10,000 requests: {res['speed']['p99_interval_10k_s'] * 1000:.1f} ms "
              "(closed form: no resampling).", ""]
    return "\n".join(lines) + NOTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
           "packages": package_versions(("numpy", "scipy", "pydantic")), "reps": args.reps, "mc_halfwidth": 1.96 * float(np.sqrt(0.95 * 0.05 / args.reps)), "n": N,
           "repeats": REPEATS, "ratio": RATIO, "tolerance": TOLERANCE, "scenarios": {}}
    for i, process in enumerate(PROCESSES):
        for j, rho in enumerate(RHOS):
            log.info("%s, rho = %g", process, rho)
            res["scenarios"][f"{process}/{rho:g}"] = one_scenario(process, rho, args.reps, seed=100 * i + j)
    res["speed"] = speed()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest_stats.json").write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
    (args.out / "loadtest_stats.md").write_text(markdown(res), encoding="utf-8")
    log.info("wrote %s", args.out / "loadtest_stats.md")


if __name__ == "__main__":
    main()
