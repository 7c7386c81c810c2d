"""lm-eval's output as report numbers: its results parsed per suite, the per-sample records kept on
disk (``runs/evaluate/<variant>/<suite>.jsonl``) and read back, the intervals counted from them, and
the comparison with the baseline variant on the same questions and documents."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from workbench import stats
from workbench.evaluate import sets
from workbench.reports import Report

log = logging.getLogger(__name__)
# Reported metric name -> lm-eval result key, per suite.
PPL_METRICS = {"ppl_word": "word_perplexity", "ppl_byte": "byte_perplexity",
               "bits_per_byte": "bits_per_byte"}
# Two reports measured the same thing when these agree (the folder's location may differ).
SAME_DATA_KEYS = ("name", "sha256", "split", "limit", "num_fewshot", "questions", "documents",
                  "chunk_words", "scoring")  # scoring: "generative" (chat) or absent (log-likelihood)


def _num(value: Any) -> float | None:
    """lm-eval writes "N/A" where it has no stderr; keep numbers only."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _metric(res: dict, name: str) -> float | None:
    return _num(res.get(f"{name},none"))


def parse_mcq(prepared: sets.PreparedSuite, out: dict, metrics: tuple[str, ...]) -> dict:
    """lm-eval results -> {overall, categories, subjects}, each with acc, acc_stderr, n."""
    results, n_samples = out["results"], out.get("n-samples", {})
    strip = sets.strip_name

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
        for prefix in (p.task_prefix for p in sets.SUITES.values()):
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
        key = next((k for k in results if strip(k) == f"{strip(group)}_{cat}"), None)
        if key:
            cat_rows[cat] = row(key, n)
    overall = row(group, sum(d["n"] or 0 for d in subjects.values()))
    return {"overall": overall, "categories": cat_rows, "subjects": dict(sorted(subjects.items()))}


def parse_perplexity(prepared: sets.PreparedSuite, out: dict) -> dict:
    res = out["results"][prepared.task]
    ns = out.get("n-samples", {}).get(prepared.task, {})
    return {**{k: _metric(res, v) for k, v in PPL_METRICS.items()}, "documents": ns.get("effective")}


def _save_samples(out: dict, path: Path) -> None:
    """Per-sample records (the raw measurements) as lm-eval logs them: the document, the scores
    (``filtered_resps``), the target, and per multiple-choice question ``acc`` (1.0 / 0.0), per
    perplexity document lm-eval's ``word_perplexity`` (loglikelihood, words) and
    ``byte_perplexity`` (loglikelihood, bytes) pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for task, rows in sorted(out.get("samples", {}).items()):
            for r in rows:
                keep = {k: r.get(k) for k in ("doc_id", "doc_hash", "target", "acc", "acc_norm",
                                              "word_perplexity", "byte_perplexity", "filtered_resps", "doc")}
                if "exact_match" in r:  # a generated answer (chat): right when the extracted letter is
                    keep["acc"] = r["exact_match"]
                    keep["resps"] = r.get("resps")  # the reply as the endpoint sent it
                    keep["extracted"] = sets.INVALID not in (r.get("filtered_resps") or [])
                f.write(json.dumps({"task": sets.strip_name(task), **keep}, default=str,
                                   ensure_ascii=False) + "\n")


def _records(samples_dir: str | Path, suite: str) -> list[dict]:
    path = Path(samples_dir) / f"{suite}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no per-sample records of {suite} at {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _unit_id(record: dict) -> str:
    """A question's or document's id, the same in every variant's records of the same data:
    lm-eval's task (prefix stripped) and its index in that task's split, e.g. "mmlu_astronomy/3"."""
    return f"{record['task']}/{record['doc_id']}"


def question_records(samples_dir: str | Path, suite: str) -> dict[str, bool]:
    """Whether each question of a multiple-choice suite ("mmlu", "ceval") was answered right, from
    ``<samples_dir>/<suite>.jsonl`` (e.g. runs/evaluate/<variant>/), keyed by "<task>/<doc_id>".
    Raises FileNotFoundError when the variant has no records of the suite."""
    return {_unit_id(r): bool(r["acc"]) for r in _records(samples_dir, suite)}


def _page_id(record: dict) -> str:
    """The source page a perplexity document came from: the chunk's ``page_id`` (written by
    ``sets.prepare_perplexity``), else the document itself (a whole page)."""
    doc = record.get("doc")
    page = doc.get("page_id") if isinstance(doc, dict) else None
    return str(page) if page is not None else _unit_id(record)


def document_records(samples_dir: str | Path) -> dict[str, tuple[float, float, str]]:
    """Per perplexity document (a chunk when ``chunk_words`` is set): (loglikelihood in nats,
    words, source page), lm-eval's ``word_perplexity`` pair and the page the chunk was cut from
    (the unit intervals resample: chunks of one page are correlated), keyed by "<task>/<doc_id>".
    Word perplexity over a set of documents is exp(-sum(loglikelihood) / sum(words)). Raises
    FileNotFoundError when the variant has no perplexity records."""
    return {_unit_id(r): (float(r["word_perplexity"][0]), float(r["word_perplexity"][1]), _page_id(r))
            for r in _records(samples_dir, "perplexity")}


def accuracy_intervals(res: dict, correct: dict[str, bool], suite: str) -> None:
    """Adds ``acc_ci`` (a Wilson interval, ``stats.Estimate`` as a dict) to the overall, category
    and subject rows of ``parse_mcq``'s result, counted from the per-question records."""
    prefix = sets.SUITES[suite].task_prefix
    by_subject: dict[str, list[bool]] = {}
    for qid, ok in correct.items():
        by_subject.setdefault(qid.rsplit("/", 1)[0].removeprefix(prefix), []).append(ok)

    def ci(answers: list[bool]) -> dict:
        return stats.proportion(sum(answers), len(answers)).model_dump()

    for subj, row in res["subjects"].items():
        row["acc_ci"] = ci(by_subject.get(subj, []))
    for cat, row in res["categories"].items():
        row["acc_ci"] = ci([ok for subj, d in res["subjects"].items() if d["category"] == cat
                            for ok in by_subject.get(subj, [])])
    res["overall"]["acc_ci"] = ci([ok for answers in by_subject.values() for ok in answers])


def paired(samples_dir: str | Path, baseline_dir: str | Path, suite: str, seed: int = 0) -> stats.Comparison:
    """This variant (a) against the baseline (b) on the units both scored, from their per-sample
    records: Newcombe's paired interval on the same questions, or for "perplexity" the word
    perplexity's % change, by a paired bootstrap over the source pages of the same documents
    (same id and word count).
    Raises FileNotFoundError when either side has no records of the suite."""
    if suite == "perplexity":
        a, b = document_records(samples_dir), document_records(baseline_dir)
        ids = sorted(i for i in a.keys() & b.keys() if a[i][1] == b[i][1])
        return stats.perplexity_change([a[i][0] for i in ids], [b[i][0] for i in ids],
                                       [a[i][1] for i in ids], seed=seed, clusters=[b[i][2] for i in ids])
    a, b = question_records(samples_dir, suite), question_records(baseline_dir, suite)
    ids = sorted(a.keys() & b.keys())
    return stats.paired_accuracy([a[i] for i in ids], [b[i] for i in ids])


def _paired_metrics(suite: str, c: stats.Comparison) -> dict[str, float | None]:
    """The flat view of a paired comparison (MLflow, ``dvc metrics``)."""
    d = c.diff
    if suite == "perplexity":
        return {"ppl_word_change_pct": d.value, "ppl_word_change_pct_ci_lo": d.lo,
                "ppl_word_change_pct_ci_hi": d.hi}
    return {f"{suite}_acc_delta_ci_lo": d.lo, f"{suite}_acc_delta_ci_hi": d.hi,
            f"{suite}_acc_delta_p": c.p_value}


def compare(metrics: dict[str, float], fingerprint: dict, baseline: Report,
            samples_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Differences to the baseline variant, only for suites that read the same data the same way:
    the headline numbers' deltas, and with ``samples_dir`` (this variant's per-sample records) the
    paired comparisons on the same questions and documents (``paired``), read from the folder the
    baseline's report names. A baseline without records costs a warning and that comparison."""
    deltas, skipped, compared = {}, [], []
    for suite in ("mmlu", "ceval", "perplexity"):
        mine, theirs = fingerprint.get(suite), baseline.data_fingerprint.get(suite)
        if not mine or not theirs:
            continue
        if any(mine.get(k) != theirs.get(k) for k in SAME_DATA_KEYS):
            skipped.append(suite)
            continue
        compared.append(suite)
        keys = list(PPL_METRICS) if suite == "perplexity" else [f"{suite}_acc"]
        for k in keys:
            if k in metrics and k in baseline.metrics:
                deltas[f"{k}_delta"] = round(metrics[k] - baseline.metrics[k], 6)
    comparisons, unpaired = {}, {}
    baseline_dir = baseline.outputs.get("samples")
    for suite in compared if samples_dir is not None else []:
        try:
            if not baseline_dir:
                raise FileNotFoundError(f"the {baseline.variant} report names no per-sample records")
            c = paired(samples_dir, baseline_dir, suite, seed)
        except FileNotFoundError as err:
            log.warning("evaluate: %s not compared with %s question by question: %s",
                        suite, baseline.variant, err)
            unpaired[suite] = str(err)
            continue
        comparisons[suite] = c.model_dump()
        deltas.update({k: v if k.endswith("_p") else round(v, 6)  # a small p stays readable
                       for k, v in _paired_metrics(suite, c).items() if v is not None})
    return {"baseline": baseline.variant, "baseline_created_at": baseline.created_at,
            "deltas": deltas, "not_comparable": skipped, "paired": comparisons, "not_paired": unpaired}
