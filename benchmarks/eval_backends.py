"""Same model, same data, one run: lm-eval through the served vLLM, in-process vLLM and transformers.

    python benchmarks/eval_backends.py --num-fewshot 5                   # models/base, 5-shot as the pipeline
    python benchmarks/eval_backends.py --model-dir /tmp/wb/base --limit 10 --backends vllm-server hf
    python benchmarks/eval_backends.py --backends vllm hf hf:1           # BACKEND[:BATCH_SIZE]

Each backend runs the full ``evaluate`` stage (workbench.evaluate.run) on the shipped smoke data
with identical settings, in a scratch folder (no report in the project is touched). Printed per
backend: start-up (server cold start / model load), scoring time (the lm-eval calls), total wall
time, and the numbers, so a speed difference is never a quality difference in disguise. Ratios
are hf's time over each backend's (above 1: faster than hf), for scoring and for the whole run. A backend that fails is a row with its error.
The rows, the settings and the machine go to --json (default results/benchmarks/eval_backends.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from workbench import evaluate, variants
from workbench.config import EvaluateConfig
from workbench.evaluate.details import EvaluateDetails
from workbench.reports import cpu_info, provenance

ROOT = Path(__file__).resolve().parents[1]


def measure(spec: str, model_dir: Path, limit: int | None, fewshot: int) -> dict:
    backend, _, batch = spec.partition(":")
    data = ROOT / "data" / "eval"
    cfg = EvaluateConfig.model_validate({
        "variant": f"bench-{backend}", "backend": backend, "model_dir": str(model_dir),
        "batch_size": int(batch) if batch else "auto",
        "mmlu": {"data_dir": str(data / "mmlu_smoke"), "limit": limit, "num_fewshot": fewshot},
        "ceval": {"data_dir": str(data / "ceval_smoke"), "limit": limit, "num_fewshot": fewshot},
        "perplexity": {"data_dir": str(data / "ppl_corpus")}, "baseline": None,
    })
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]  # on a shared machine, what else was running shows here
    try:
        report = evaluate.run(cfg)
    except Exception as err:  # a failed backend is a row, not the end of the comparison
        logging.exception("backend %s failed", spec)
        return {"backend": spec, "error": f"{type(err).__name__}: {err}"[:300]}
    d = EvaluateDetails.of(report)
    t = d.timings
    scoring = sum(v for k, v in t.items() if k != "backend_start_s")
    return {"backend": spec, "batch_size": d.backend.batch_size,
            "start_s": t["backend_start_s"], "scoring_s": round(scoring, 2),
            "wall_s": round(time.perf_counter() - t0, 2), "timings": t,
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "dtype": d.backend.model_args.get("dtype") if isinstance(d.backend.model_args, dict) else None,
            "mmlu_questions": report.metrics.get("mmlu_n"), "ceval_questions": report.metrics.get("ceval_n"),
            "ppl_documents": d.suites.get("perplexity", {}).get("documents"),
            **{k: report.metrics.get(k) for k in ("mmlu_acc", "ceval_acc", "ppl_word", "bits_per_byte")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=variants.model_dir(variants.BASE))
    p.add_argument("--limit", type=int, default=10, help="questions per subject")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=["vllm-server", "vllm", "hf"])
    p.add_argument("--json", default=str(ROOT / "results/benchmarks/eval_backends.json"),
                   help="the rows, settings and machine, rewritten after every backend")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_dir = Path(args.model_dir).resolve()
    rows = []
    out = Path(args.json).resolve()
    with tempfile.TemporaryDirectory(prefix="wb-bench-eval-") as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)  # reports/ and runs/ of the benchmark stay out of the project
        try:
            for backend in args.backends:
                rows.append(measure(backend, model_dir, args.limit, args.num_fewshot))
                print(json.dumps(rows[-1]), flush=True)
                write(out, args, rows)  # after every backend: an interrupted run keeps its rows
        finally:
            os.chdir(cwd)
    # Speed-ups are relative to lm-eval's hf backend (the first hf row): >1 means faster than hf.
    ref = next((r for r in rows if r["backend"].startswith("hf") and "error" not in r), None)
    print(f"\n{'backend':<14} {'batch':>6} {'start s':>8} {'scoring s':>10} {'wall s':>8} "
          f"{'scoring x hf':>12} {'wall x hf':>9} {'mmlu':>6} {'ceval':>6} {'ppl_word':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<14} failed: {r['error']}")
            continue
        sx = f"{ref['scoring_s'] / r['scoring_s']:.2f}" if ref else "-"
        wx = f"{ref['wall_s'] / r['wall_s']:.2f}" if ref else "-"
        print(f"{r['backend']:<14} {str(r['batch_size']):>6} {r['start_s']:>8.1f} {r['scoring_s']:>10.1f} "
              f"{r['wall_s']:>8.1f} {sx:>12} {wx:>9} {r['mmlu_acc']:>6.3f} {r['ceval_acc']:>6.3f} "
              f"{r['ppl_word']:>9.3f}")
    print(f"\nwritten to {out}")


def write(path: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows so far, with the settings, the machine and the code version."""
    doc = {"schema_version": 1, "benchmark": "eval_backends",
           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_sha": provenance().git_sha,
           "config": {**vars(args), "json": os.path.relpath(path, ROOT)}, "platform": {"python": platform.python_version(), "machine": platform.machine(), **cpu_info()},
           "complete": len(rows) == len(args.backends), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
