"""Cross-check our generator against `vllm bench serve` on the same real vLLM server and workload.

    python benchmarks/loadgen_crosscheck.py --model-dir models/base          # vLLM-CPU, ~5 min
    python benchmarks/loadgen_crosscheck.py --base-url http://127.0.0.1:8000 --model NAME --tokenizer DIR

Both clients send the same shape of load, one after the other, to one server: random/synthetic
prompts of --input-tokens, exactly --output-tokens generated (ignore_eos), evenly spaced arrivals at
--rate (below saturation), --requests each, streamed chat completions. The medians of TTFT and
end-to-end latency should agree within 10% (the issue's bar); the ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from loadgen_peers import run as run_cmd  # noqa: E402

from workbench import variants  # noqa: E402
from workbench.config import ServerConfig  # noqa: E402

VLLM_SNIPPET = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
p = FlexibleArgumentParser(); add_cli_args(p)
r = main(p.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: r.get(k) for k in ("completed", "failed", "median_ttft_ms", "median_e2el_ms", "median_tpot_ms")}))
"""


def ours(url, a) -> dict:
    cmd = [sys.executable, "-m", "workbench.loadgen", "--base-url", f"{url}/v1", "--model", a.model,
           "--rate", str(a.rate), "--requests", str(a.requests), "--arrival", a.arrival,
           "--workload", "synthetic", "--input-tokens", str(a.input_tokens),
           "--output-tokens", str(a.output_tokens), "--ignore-eos", "--no-scrape", "--seed", "1"]
    [m] = json.loads(run_cmd(cmd, a.timeout)).values()
    return {"completed": m["completed"], "ttft_ms_p50": m["ttft_ms_p50"],
            "e2el_ms_p50": m["e2el_ms_p50"], "tpot_ms_p50": m.get("tpot_ms_p50")}


def vllm_bench(url, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", VLLM_SNIPPET, "--backend", "openai-chat", "--base-url", url,
               "--endpoint", "/v1/chat/completions", "--model", a.model, "--tokenizer", a.tokenizer,
               "--dataset-name", "random", "--random-input-len", str(a.input_tokens),
               "--random-output-len", str(a.output_tokens), "--ignore-eos",
               "--num-prompts", str(a.requests), "--request-rate", str(a.rate), "--seed", "1",
               *(["--burstiness", "inf"] if a.arrival == "constant" else []),  # vLLM: inf = even gaps
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm", "--num-warmups", "0",
               "--result-dir", tmp]
        line = next(l for l in run_cmd(cmd, a.timeout).splitlines() if l.startswith("RESULT "))
    r = json.loads(line[7:])
    return {"completed": r["completed"], "ttft_ms_p50": r["median_ttft_ms"],
            "e2el_ms_p50": r["median_e2el_ms"], "tpot_ms_p50": r["median_tpot_ms"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=variants.model_dir(variants.BASE), help="managed vLLM on this folder")
    p.add_argument("--base-url", default=None, help="an already running server (root URL)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokenizer", default=None, help="default: --model-dir")
    # Below saturation and with even gaps longer than one request (E2EL ~2 s for 32 tokens here),
    # so neither client's arrival randomness changes how the server batches: what remains is
    # how each client measures.
    p.add_argument("--rate", type=float, default=0.4)
    p.add_argument("--arrival", default="constant", choices=["constant", "poisson"])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="runs/benchmarks/loadgen_crosscheck.json")
    a = p.parse_args()
    a.tokenizer = a.tokenizer or a.model_dir
    if a.base_url:
        ctx = nullcontext(a.base_url)
    else:
        from workbench.serve import VLLMServer

        ctx = VLLMServer(ServerConfig(model_dir=a.model_dir, served_name=a.model))
    with ctx as server:
        url = server if isinstance(server, str) else server.root_url
        ours(url, argparse.Namespace(**{**vars(a), "requests": 3}))  # warm the server's caches
        results = {"ours": ours(url, a), "vllm_bench_serve": vllm_bench(url, a)}
    o, v = results["ours"], results["vllm_bench_serve"]
    results["ratio_ours_over_vllm"] = {k: round(o[k] / v[k], 3) for k in ("ttft_ms_p50", "e2el_ms_p50")}
    results["within_10pct"] = all(abs(r - 1) <= 0.10 for r in results["ratio_ours_over_vllm"].values())
    results["setup"] = {k: getattr(a, k) for k in ("rate", "arrival", "requests", "input_tokens", "output_tokens")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
