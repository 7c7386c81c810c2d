"""The same questions through chat completions on two engines: the base variant on vLLM and the
embedded default's GGUF on llama.cpp, in one run, compared question by question.

    python benchmarks/chat_eval_arms.py                          # models/base (prepared if absent), 5-shot
    python benchmarks/chat_eval_arms.py --limit 4 --num-fewshot 1
    python benchmarks/chat_eval_arms.py --arms vllm llamacpp vllm-loglik   # + vLLM's log-likelihood scores

Each arm runs the full ``evaluate`` stage (workbench.evaluate.run) with ``backend: chat`` on the
shipped smoke data (NOT MMLU or C-Eval: see data/eval/README.md) in a scratch folder; the managed
server is started and stopped by the stage. Per arm: accuracy with its Wilson interval, extraction
failures, perplexity or why it is not available, start-up and scoring time. Per pair of arms and
suite: Newcombe's paired interval on the same questions (workbench.stats.paired_accuracy through
evaluate.paired). ``vllm-loglik`` scores the same questions by log-likelihood (backend vllm-server)
for reference. Rows, settings and the machine go to --json (default
results/benchmarks/chat_eval_arms.json) and a table to the .md beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from workbench import evaluate, variants
from workbench.config import EvaluateConfig, PrepareConfig
from workbench.evaluate.details import EvaluateDetails
from workbench.reports import cpu_info, provenance

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # arm -> (backend, chat.server)
    "vllm": ("chat", "vllm"),
    "llamacpp": ("chat", "llamacpp"),
    "vllm-loglik": ("vllm-server", "vllm"),
}


def measure(arm: str, model_dir: Path, limit: int | None, fewshot: int) -> dict:
    backend, server = ARMS[arm]
    data = ROOT / "data" / "eval"
    cfg = EvaluateConfig.model_validate({
        "variant": arm, "backend": backend, "model_dir": str(model_dir), "baseline": None,
        "chat": {"server": server}, "fallback_backend": None,
        "mmlu": {"data_dir": str(data / "mmlu_smoke"), "limit": limit, "num_fewshot": fewshot},
        "ceval": {"data_dir": str(data / "ceval_smoke"), "limit": limit, "num_fewshot": fewshot},
        "perplexity": {"data_dir": str(data / "ppl_corpus")},
    })
    t0 = time.perf_counter()
    try:
        report = evaluate.run(cfg)
    except Exception as err:  # a failed arm is a row, not the end of the comparison
        logging.exception("arm %s failed", arm)
        return {"arm": arm, "error": f"{type(err).__name__}: {err}"[:300]}
    d, m = EvaluateDetails.of(report), report.metrics
    suites = d.suites
    row = {"arm": arm, "backend": backend, "engine": (d.backend.model_extra or {}).get("engine", "vLLM"),
           "start_s": d.timings["backend_start_s"], "wall_s": round(time.perf_counter() - t0, 1),
           "samples": report.outputs["samples"]}
    for s in ("mmlu", "ceval"):
        o = suites[s]["overall"]
        row[s] = {"acc": o["acc"], "ci": [o["acc_ci"]["lo"], o["acc_ci"]["hi"]], "n": o["n"],
                  "extraction_failures": (suites[s].get("extraction_failures") or {}).get("n"),
                  "eval_s": suites[s]["eval_s"]}
    ppl = suites.get("perplexity", {})
    row["perplexity"] = ({"ppl_word": m.get("ppl_word"), "ci": [m.get("ppl_word_ci_lo"), m.get("ppl_word_ci_hi")]}
                         if "not_available" not in ppl else {"not_available": ppl["not_available"]})
    return row


def compare(rows: list[dict]) -> list[dict]:
    out = []
    ok = [r for r in rows if "error" not in r]
    for a, b in itertools.combinations(ok, 2):
        for s in ("mmlu", "ceval"):
            c = evaluate.paired(a["samples"], b["samples"], s)
            out.append({"a": a["arm"], "b": b["arm"], "suite": s, "diff": c.diff.value,
                        "ci": [c.diff.lo, c.diff.hi], "p_value": c.p_value, "n": c.n,
                        "significant": c.significant, "method": c.method})
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(rows: list[dict], pairs: list[dict], settings: dict) -> str:
    lines = [f"# Chat-completions scoring on two engines ({settings['date']})", "",
             f"Command: `{settings['command']}`. Smoke data (not MMLU / C-Eval), {settings['num_fewshot']}-shot, "
             f"limit {settings['limit']}; CPU: {settings['cpu']['processor']} ({settings['cpu']['cpus']} CPUs).", "",
             "| arm | engine | MMLU acc % [95 % CI] | n | no letter | C-Eval acc % [95 % CI] | n | no letter "
             "| perplexity | start s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arm']} | error: {r['error']} |")
            continue
        mm, ce, p = r["mmlu"], r["ceval"], r["perplexity"]
        ppl = (f"{p['ppl_word']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]" if "ppl_word" in p and p["ppl_word"]
               else "not available")
        lines.append(f"| {r['arm']} | {r['engine']} | {_pct(mm['acc'])} [{_pct(mm['ci'][0])}, {_pct(mm['ci'][1])}] "
                     f"| {mm['n']} | {mm['extraction_failures']} | {_pct(ce['acc'])} [{_pct(ce['ci'][0])}, "
                     f"{_pct(ce['ci'][1])}] | {ce['n']} | {ce['extraction_failures']} | {ppl} | {r['start_s']:.1f} "
                     f"| {r['wall_s']:.0f} |")
    lines += ["", "Paired (same questions, exact McNemar): a − b in accuracy points.", "",
              "| a | b | suite | a − b [95 % CI] | p | n |", "|---|---|---|---|---|---|"]
    for c in pairs:
        lines.append(f"| {c['a']} | {c['b']} | {c['suite']} | {_pct(c['diff'])} [{_pct(c['ci'][0])}, "
                     f"{_pct(c['ci'][1])}] | {c['p_value']:.3g} | {c['n']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["vllm", "llamacpp"], choices=list(ARMS))
    ap.add_argument("--model-dir", default=variants.model_dir(variants.BASE), help="the base variant (prepared here if absent)")
    ap.add_argument("--limit", type=int, default=None, help="questions per subject (default: all)")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "results" / "benchmarks" / "chat_eval_arms.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="wb-chat-arms-") as scratch:
        model_dir = Path(args.model_dir).resolve()
        cwd = os.getcwd()
        os.chdir(scratch)  # reports/ and runs/ of these runs stay out of the project
        try:
            if not (model_dir / "config.json").exists():
                from workbench import prepare

                model_dir = Path(scratch) / "base"
                prepare.run(PrepareConfig(out_dir=str(model_dir), embedding=None))
            rows = [measure(arm, model_dir, args.limit, args.num_fewshot) for arm in args.arms]
            pairs = compare(rows)
        finally:
            os.chdir(cwd)
    for r in rows:
        r.pop("samples", None)
    settings = {"arms": args.arms, "limit": args.limit, "num_fewshot": args.num_fewshot,
                "date": time.strftime("%Y-%m-%d"), "cpu": cpu_info(), "provenance": provenance().model_dump(),
                "command": " ".join(["python", "benchmarks/chat_eval_arms.py", *sys.argv[1:]])}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "arms": rows, "paired": pairs}, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(rows, pairs, settings))
    logging.info("wrote %s and %s\n%s", out, out.with_suffix(".md"), markdown(rows, pairs, settings))


if __name__ == "__main__":
    main()
