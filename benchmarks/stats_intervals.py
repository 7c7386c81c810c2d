"""What every interval of one load-test report costs: 100,000 request records, side by side with
the point estimates alone (``metrics.step_metrics``, what the report computed before intervals).

    python benchmarks/stats_intervals.py                         # 100,000 requests x 128 tokens
    python benchmarks/stats_intervals.py --requests 20000 --tokens 32 --out results/benchmarks/x.json

Synthetic records (lognormal TTFT, gamma inter-token gaps, a few failures) go through the same
functions the load-test stage calls: ``summary.step_summary`` (TTFT / TPOT / ITL / E2EL
percentiles with order-statistic intervals, Wilson goodput, SLO verdicts), ``rate_summaries``
(pooled), and ``drift_check`` (Mann-Whitney U). Each timing is the best of ``--repeat`` runs, and
the JSON result records the machine and package versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from workbench.config import SLOConfig
from workbench.loadgen import metrics
from workbench.loadgen.client import Record
from workbench.loadgen.summary import columns, drift_check, rate_summaries, step_summary
from workbench.reports import package_versions, write_json_atomic


def records(n: int, tokens: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    send = np.sort(rng.uniform(0, n / 100, n))
    ttft = rng.lognormal(np.log(0.08), 0.4, n)
    gaps = rng.gamma(4.0, 0.005, (n, tokens - 1))
    fail = rng.random(n) < 0.01
    out = []
    for i in range(n):
        first = send[i] + ttft[i]
        chunks = (first + np.concatenate([[0.0], np.cumsum(gaps[i])])).tolist()
        ok = not fail[i]
        out.append(Record(f"r{i}", "bench", False, float(send[i]), send_s=float(send[i]),
                          first_token_s=float(first) if ok else None, chunk_s=chunks if ok else [],
                          end_s=chunks[-1] if ok else float(first), prompt_tokens=256,
                          completion_tokens=tokens if ok else None, success=ok, streamed=True,
                          error=None if ok else "http_503"))
    return out


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request (ITL samples)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="results/benchmarks/stats_intervals.json")
    args = ap.parse_args()
    slo = SLOConfig(ttft_ms=300, e2el_ms=None)
    recs = records(args.requests, args.tokens)
    half = args.requests // 2
    flat = metrics.step_metrics(recs, 100.0, slo)

    cols = columns(recs, slo)
    first, second = columns(recs[:half], slo), columns(recs[half:], slo)

    def intervals():  # every interval of the report, from the requests' arrays
        step = step_summary("bench", "rate_100", 100.0, recs, slo, flat, cols=cols)
        rate_summaries([step], {0: cols}, slo)
        drift_check(step, first, second)

    t_points = best_of(lambda: metrics.step_metrics(recs, 100.0, slo), args.repeat)
    t_columns = best_of(lambda: columns(recs, slo), args.repeat)
    t_intervals = best_of(intervals, args.repeat)
    result = {
        "requests": args.requests, "tokens_per_request": args.tokens,
        "itl_samples": args.requests * (args.tokens - 1),
        "point_estimates_s": round(t_points, 4),
        "records_to_arrays_s": round(t_columns, 4), "all_intervals_s": round(t_intervals, 4),
        "ratio_intervals_to_points": round(t_intervals / t_points, 3),
        "ratio_arrays_and_intervals_to_points": round((t_columns + t_intervals) / t_points, 3),
        "what": ("point estimates: metrics.step_metrics from the records (the report's cost before "
                 "intervals); records_to_arrays: summary.columns, one pass over the records; all "
                 "intervals: step_summary + rate_summaries + drift_check from those arrays"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "packages": package_versions(("numpy", "scipy", "pydantic")),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
