"""Cold start vs warm start of the vLLM server, and single-request latency, side by side.

    python benchmarks/serve_startup.py                      # models/base (after dvc repro)
    python benchmarks/serve_startup.py --model-dir DIR --requests 10

"cold" runs with an empty VLLM_CACHE_ROOT (torch.compile from scratch), "warm" with the default
cache that the cold run just filled. Latency: greedy chat answers of 32 tokens, non-streamed
(end-to-end) and streamed (time to first content chunk), median of --requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import openai

from workbench import variants
from workbench.config import ServerConfig
from workbench.serve import VLLMServer

PROMPT = [{"role": "user", "content": "Which city is the capital of France?"}]


def measure(cfg: ServerConfig, requests: int) -> dict:
    with VLLMServer(cfg) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        e2e, ttft = [], []
        for _ in range(requests):
            t0 = time.perf_counter()
            client.chat.completions.create(model=cfg.model_name, messages=PROMPT, temperature=0,
                                           max_tokens=32)
            e2e.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for chunk in client.chat.completions.create(model=cfg.model_name, messages=PROMPT,
                                                        temperature=0, max_tokens=32, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft.append(time.perf_counter() - t0)
                    break
        return {"startup_s": round(server.startup_s, 1),
                "chat_e2e_p50_ms": round(1000 * statistics.median(e2e), 1),
                "chat_ttft_p50_ms": round(1000 * statistics.median(ttft), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=variants.model_dir(variants.BASE))
    p.add_argument("--requests", type=int, default=5)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as empty_cache:
        cold = ServerConfig(model_dir=args.model_dir, env={"VLLM_CACHE_ROOT": empty_cache})
        results["cold"] = measure(cold, args.requests)
    results["warm"] = measure(ServerConfig(model_dir=args.model_dir), args.requests)
    results["cold_over_warm_startup"] = round(results["cold"]["startup_s"] / results["warm"]["startup_s"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
