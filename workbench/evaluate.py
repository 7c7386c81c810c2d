"""Stage ``evaluate``: MMLU, C-Eval and perplexity of one model variant, all through lm-eval.

    workbench evaluate                                         # models/base, served by vLLM
    python -m pipelines.run_stage evaluate --variant gptq-int4 --set evaluate.mmlu.limit=5
    workbench evaluate --set evaluate.backend=hf               # lm-eval's transformers reference

Backends (a registry below): ``vllm-server`` asks ``workbench.serve`` for the variant's OpenAI
endpoint and scores prompts through lm-eval's ``local-completions`` (``/v1/completions`` with
``echo``, ``logprobs``: prompt log-probabilities); ``vllm`` is lm-eval's in-process vLLM model;
``hf`` is lm-eval's transformers model. Tasks, prompts and scorers are lm-eval's own
(``mmlu``, ``ceval-valid``, ``wikitext``); ``workbench.evalsets`` only points them at local files.

The report (reports/evaluate/<variant>.json) holds overall / per-category / per-subject accuracy
with standard errors, perplexities, the data's names and sha256, the backend and timings, and
the difference to the ``baseline`` variant's report when one exists and used the same data.
Per-question records go to runs/evaluate/<variant>/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from workbench import evalsets
from workbench.config import EvaluateConfig
from workbench.reports import Report, read_report, report_path, tree_fingerprint, write_json_atomic, write_report

log = logging.getLogger(__name__)
STAGE = "evaluate"
# Reported metric name -> lm-eval result key, per suite.
PPL_METRICS = {"ppl_word": "word_perplexity", "ppl_byte": "byte_perplexity",
               "bits_per_byte": "bits_per_byte"}


@dataclass
class Backend:
    name: str
    lm_eval_model: str  # lm-eval's registered model name
    model_args: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the report (endpoint, startup)
    device: str | None = None  # lm-eval's device argument (hf: "cpu" / "cuda")


def _vllm_server(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    from workbench.serve import VLLMServer

    server_cfg = cfg.server.model_copy(update={"model_dir": cfg.model_path})
    info: dict[str, Any] = {"served_name": server_cfg.served_name}
    if cfg.endpoint:
        root = cfg.endpoint.rstrip("/").removesuffix("/v1")
        info["endpoint"] = root
    else:
        server = stack.enter_context(VLLMServer(server_cfg))  # stopped when the stack closes
        root = server.root_url
        info.update(endpoint=root, server_startup_s=round(server.startup_s, 3),
                    server_command=" ".join(server.command()))
    args = {
        "base_url": f"{root}/v1/completions",
        "model": server_cfg.served_name,
        # Token ids go over the wire (tokenized_requests), so the server scores exactly the
        # tokens the hf backend scores; the tokenizer is the variant's own folder.
        "tokenizer": cfg.model_path,
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_length": server_cfg.max_model_len,
        "num_concurrent": 1,  # one request at a time: same numbers on every run
        "max_retries": 3,
        "timeout": 600,
        "seed": cfg.seed,
    }
    if server_cfg.api_key:
        os.environ.setdefault("OPENAI_API_KEY", server_cfg.api_key)
    return Backend("vllm-server", "local-completions", args, info)


def _vllm_inprocess(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    args = {"pretrained": cfg.model_path, "dtype": cfg.dtype, "seed": cfg.seed,
            "max_model_len": cfg.server.max_model_len, "enforce_eager": True}
    return Backend("vllm", "vllm", args)


def _hf(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    args = {"pretrained": cfg.model_path, "dtype": cfg.dtype, "max_length": cfg.server.max_model_len}
    from workbench.serve import detect_device

    return Backend("hf", "hf", args, device="cpu" if detect_device() == "cpu" else "cuda")


BACKENDS: dict[str, Callable[[EvaluateConfig, ExitStack], Backend]] = {
    "vllm-server": _vllm_server,
    "vllm": _vllm_inprocess,
    "hf": _hf,
}


def _num(value: Any) -> float | None:
    """lm-eval writes "N/A" where it has no stderr; keep numbers only."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _metric(res: dict, name: str) -> float | None:
    return _num(res.get(f"{name},none"))


def parse_mcq(prepared: evalsets.PreparedSuite, out: dict, metrics: tuple[str, ...]) -> dict:
    """lm-eval results -> {overall, categories, subjects}, each with acc, acc_stderr, n."""
    results, n_samples = out["results"], out.get("n-samples", {})
    strip = evalsets.strip_name

    def row(key: str, n: int | None = None) -> dict:
        res = results[key]
        d = {m: _metric(res, m) for m in metrics}
        d.update({f"{m}_stderr": _metric(res, f"{m}_stderr") for m in metrics})
        if n is not None:
            d["n"] = n
        return d

    subjects, categories = {}, {}
    for key in results:
        name = strip(key)
        for prefix in (p.task_prefix for p in evalsets.SUITES.values()):
            if name.startswith(prefix) and name.removeprefix(prefix) in prepared.subjects:
                subj = name.removeprefix(prefix)
                ns = n_samples.get(key, {})
                subjects[subj] = {**row(key, ns.get("effective")), "n_available": ns.get("original"),
                                  "category": prepared.subjects[subj] or None}
    for subj, d in subjects.items():
        if d["category"]:
            categories.setdefault(d["category"], 0)
            categories[d["category"]] += d["n"] or 0
    group = prepared.task
    cat_rows = {}
    for cat, n in categories.items():
        key = next((k for k in results if strip(k) in (f"{strip(group)}_{cat}", f"mmlu_{cat}")), None)
        if key:
            cat_rows[cat] = row(key, n)
    overall = row(group, sum(d["n"] or 0 for d in subjects.values()))
    return {"overall": overall, "categories": cat_rows, "subjects": dict(sorted(subjects.items()))}


def parse_perplexity(prepared: evalsets.PreparedSuite, out: dict) -> dict:
    res = out["results"][prepared.task]
    ns = out.get("n-samples", {}).get(prepared.task, {})
    return {**{k: _metric(res, v) for k, v in PPL_METRICS.items()}, "documents": ns.get("effective")}


def _save_samples(out: dict, path: Path) -> None:
    """Per-question records (the raw measurements): prompt, scores, target, acc."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for task, rows in sorted(out.get("samples", {}).items()):
            for r in rows:
                keep = {k: r.get(k) for k in ("doc_id", "target", "acc", "acc_norm", "word_perplexity",
                                              "filtered_resps", "doc")}
                f.write(json.dumps({"task": evalsets.strip_name(task), **keep}, default=str,
                                   ensure_ascii=False) + "\n")


def compare(metrics: dict[str, float], fingerprint: dict, baseline: Report) -> dict:
    """Differences to the baseline variant, only for suites that read the same data the same way."""
    deltas, skipped = {}, []
    for suite in ("mmlu", "ceval", "perplexity"):
        mine, theirs = fingerprint.get(suite), baseline.data_fingerprint.get(suite)
        if not mine or not theirs:
            continue
        if mine != theirs:
            skipped.append(suite)
            continue
        keys = list(PPL_METRICS) if suite == "perplexity" else [f"{suite}_acc"]
        for k in keys:
            if k in metrics and k in baseline.metrics:
                deltas[f"{k}_delta"] = round(metrics[k] - baseline.metrics[k], 6)
    return {"baseline": baseline.variant, "baseline_created_at": baseline.created_at,
            "deltas": deltas, "not_comparable": skipped}


def _lm_eval_env(offline: bool) -> None:
    # Local folders need no network: never let `datasets` or the hub client wait on one. Set
    # before lm_eval (and with it `datasets`) is first imported; both read these at import time.
    # A stock task (data_dir: null) is a request for hub data, so then nothing is forced.
    if offline:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(cfg: EvaluateConfig) -> Report:
    t_start = time.perf_counter()
    _lm_eval_env(offline=all(s.data_dir for s in (cfg.mmlu, cfg.ceval, cfg.perplexity) if s.enabled))
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    model_dir = Path(cfg.model_path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"variant '{cfg.variant}': model folder {model_dir} does not exist")
    samples_dir = Path(cfg.work_dir) / cfg.variant
    suites_out: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    fingerprint: dict[str, Any] = {"model": {"path": str(model_dir), **tree_fingerprint(model_dir)}}
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="wb-eval-tasks-") as include_dir, ExitStack() as stack:
        prepared: list[tuple[evalsets.PreparedSuite, Any]] = []
        for key in ("mmlu", "ceval"):
            scfg = getattr(cfg, key)
            if scfg.enabled:
                p = evalsets.prepare_suite(evalsets.SUITES[key], scfg.data_dir, scfg.subjects,
                                           Path(include_dir))
                prepared.append((p, scfg))
        if cfg.perplexity.enabled:
            prepared.append((evalsets.prepare_perplexity(cfg.perplexity.data_dir, Path(include_dir)),
                             cfg.perplexity))
        task_manager = TaskManager(include_path=include_dir)

        t0 = time.perf_counter()
        backend = BACKENDS[cfg.backend](cfg, stack)
        lm = get_model(backend.lm_eval_model).create_from_arg_obj(
            backend.model_args, {"batch_size": cfg.batch_size, "device": backend.device})
        timings["backend_start_s"] = round(time.perf_counter() - t0, 3)

        for p, scfg in prepared:
            fewshot = getattr(scfg, "num_fewshot", 0)
            log.info("evaluate %s: %s (%s) on %s, limit=%s, %d-shot", cfg.variant, p.key,
                     p.source["name"], backend.name, scfg.limit, fewshot)
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[p.task], num_fewshot=fewshot, limit=scfg.limit,
                task_manager=task_manager, log_samples=True, bootstrap_iters=1000,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
            )
            seconds = round(time.perf_counter() - t0, 3)
            timings[f"{p.key}_s"] = seconds
            _save_samples(out, samples_dir / f"{p.key}.jsonl")
            fingerprint[p.key] = {**p.source, "limit": scfg.limit, "num_fewshot": fewshot}
            if p.key == "perplexity":
                res = parse_perplexity(p, out)
                metrics.update({k: res[k] for k in PPL_METRICS if res[k] is not None})
            else:
                res = parse_mcq(p, out, evalsets.SUITES[p.key].metrics)
                overall = res["overall"]
                fingerprint[p.key]["questions"] = overall["n"]
                metrics[f"{p.key}_acc"] = overall["acc"]
                metrics[f"{p.key}_acc_stderr"] = overall["acc_stderr"]
                metrics[f"{p.key}_n"] = float(overall["n"])
            metrics[f"{p.key}_eval_s"] = seconds
            suites_out[p.key] = {**res, "data": fingerprint[p.key], "eval_s": seconds,
                                 "lm_eval_task": p.task, "configs_version": out.get("versions", {})}
    metrics["eval_s"] = round(time.perf_counter() - t_start, 3)
    metrics = {k: round(v, 6) for k, v in metrics.items() if v is not None}

    details: dict[str, Any] = {
        "backend": {"name": backend.name, "lm_eval_model": backend.lm_eval_model,
                    "model_args": backend.model_args, **backend.info},
        "suites": suites_out, "timings": timings,
        "note": "Accuracy on the data named in each suite's 'data.name'; smoke samples are not "
                "MMLU or C-Eval scores.",
    }
    if cfg.baseline and cfg.variant != cfg.baseline and report_path(STAGE, cfg.baseline).exists():
        base = read_report(report_path(STAGE, cfg.baseline))
        details["vs_baseline"] = compare(metrics, fingerprint, base)
    report = Report(stage=STAGE, variant=cfg.variant, config=cfg.model_dump(mode="json"),
                    data_fingerprint=fingerprint, metrics=metrics, details=details,
                    outputs={"samples": str(samples_dir)})
    write_report(report)
    log.info("evaluate %s: %s", cfg.variant, {k: v for k, v in metrics.items() if "_s" not in k})
    return report


def for_variant(cfg: EvaluateConfig, variant: str) -> EvaluateConfig:
    """The same settings for another variant (the notebook's and DVC's ``variant`` parameter)."""
    return EvaluateConfig.model_validate({**cfg.model_dump(), "variant": variant})


def subject_table(report: Report):
    """One row per (suite, subject): accuracy, stderr, questions. For notebooks."""
    import pandas as pd

    rows = []
    for suite, res in report.details["suites"].items():
        for subj, d in res.get("subjects", {}).items():
            rows.append({"suite": suite, "subject": subj, "category": d.get("category"),
                         "acc": d["acc"], "acc_stderr": d["acc_stderr"], "n": d["n"]})
    return pd.DataFrame(rows)


def summary(report: Report):
    """Headline numbers with their data, one row per suite. For notebooks."""
    import pandas as pd

    rows = []
    deltas = report.details.get("vs_baseline", {}).get("deltas", {})
    for suite, res in report.details["suites"].items():
        data = res["data"]
        if suite == "perplexity":
            value = {k: res[k] for k in PPL_METRICS}
        else:
            value = {"acc": res["overall"]["acc"], "acc_stderr": res["overall"]["acc_stderr"],
                     "n": res["overall"]["n"]}
        rows.append({"suite": suite, **value, "data": data["name"], "sha256": (data["sha256"] or "")[:12],
                     **{k: v for k, v in deltas.items() if k.startswith(suite) or
                        (suite == "perplexity" and not k.startswith(("mmlu", "ceval")))}})
    return pd.DataFrame(rows)
