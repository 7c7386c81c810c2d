"""One load-generator sweep from the shell against any OpenAI-compatible endpoint; prints the
per-step metrics as JSON (and writes raw records with --records)::

    python -m workbench.loadgen --base-url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct \
        --rate 1 --rate 2 --requests 20 --workload sharegpt --path data/workloads/smoke.sharegpt.json
"""

from __future__ import annotations

import argparse
import json
import sys

from workbench import logconfig
from workbench.config import LoadtestConfig, SLOConfig, WorkloadConfig
from workbench.loadgen import summary
from workbench.loadgen.client import Target
from workbench.loadgen.runner import run_async, sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="ends in /v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions", "embeddings"])
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--rate", type=float, action="append", required=True, help="req/s (inf ok), repeatable")
    p.add_argument("--requests", type=int, default=100, help="measured requests per step")
    p.add_argument("--duration-s", type=float, default=None)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--arrival", default="poisson", choices=["poisson", "constant", "bursty"])
    p.add_argument("--burstiness", type=float, default=0.5)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--workload", default="synthetic", choices=["sharegpt", "jsonl", "synthetic"])
    p.add_argument("--path", default=None)
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scrape", action="store_true", help="skip /metrics and utilization")
    p.add_argument("--ignore-eos", action="store_true", help="vLLM extension: exactly --output-tokens")
    p.add_argument("--records", default=None, help="write every raw record here (JSONL)")
    a = p.parse_args(argv)
    logconfig.setup()  # to stderr: stdout carries the table
    cfg = LoadtestConfig(
        base_url=a.base_url, model=a.model, api_key=a.api_key, endpoint=a.endpoint, stream=not a.no_stream,
        workload=WorkloadConfig(kind=a.workload, path=a.path, input_tokens=a.input_tokens,
                                output_tokens=a.output_tokens, max_tokens=a.output_tokens,
                                ignore_eos=a.ignore_eos),
        arrival=a.arrival, burstiness=a.burstiness, rates=a.rate, requests_per_step=a.requests,
        duration_s=a.duration_s, warmup_requests=a.warmup, max_concurrency=a.max_concurrency,
        seed=a.seed, slo=SLOConfig(), scrape_metrics=not a.no_scrape)
    target = Target(a.base_url, a.model, a.endpoint, not a.no_stream, a.api_key, ignore_eos=a.ignore_eos)
    root = a.base_url.rstrip("/").removesuffix("/v1")
    results = run_async(sweep(cfg, target, root))
    if a.records:
        with open(a.records, "w") as f:
            for res in results:
                for rec in res.records:
                    f.write(json.dumps(rec.to_dict()) + "\n")
    steps = [summary.step_summary("endpoint", r.label, r.rate, r.records, cfg.slo, r.metrics, position=i,
                                  limited_by=r.limited_by) for i, r in enumerate(results)]
    print(json.dumps([s.model_dump(mode="json") for s in steps], indent=1))  # every figure with its interval
    return 0


if __name__ == "__main__":
    sys.exit(main())
