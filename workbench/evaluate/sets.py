"""Evaluation suites as lm-eval tasks: MMLU, C-Eval (valid) and document perplexity.

Nothing here scores or prompts: every task is lm-eval's own. For a local data folder this module
writes, into a temporary folder handed to ``TaskManager(include_path=...)``, one small YAML per
subject that ``include:``s lm-eval's installed per-subject YAML (prompt template, description,
metrics, splits) and changes only where the rows come from::

    include: .../lm_eval/tasks/mmlu/default/mmlu_astronomy.yaml
    task: wb_mmlu_astronomy
    dataset_path: json                       # or parquet / csv, by file extension
    dataset_kwargs: {data_files: {test: [...], dev: [...]}}

plus group YAMLs that aggregate them as lm-eval's ``mmlu`` / ``ceval-valid`` groups do (size
weighted). With no local folder, lm-eval's stock task runs unchanged and reads the hub.

A data folder may carry ``dataset.json`` ({"name": ..., "note": ...}) naming what it holds; the
report repeats it next to the files' sha256, so a smoke sample is never mistaken for MMLU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.reports import sha256_file

log = logging.getLogger(__name__)
PREFIX = "wb_"  # generated task and group names; stripped again when results are read
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
CARD = "dataset.json"


class EvalDataError(ValueError):
    """A data folder that cannot serve a suite; the message says what is missing where."""


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


@dataclass(frozen=True)
class Suite:
    """One lm-eval multiple-choice benchmark, described by where its per-subject YAMLs live."""

    key: str  # "mmlu": params section and metric prefix
    stock_group: str  # lm-eval group run when no local folder is configured
    task_glob: str  # lm-eval's per-subject YAML files, relative to lm_eval/tasks
    task_prefix: str  # per-subject task name = task_prefix + subject
    metrics: tuple[str, ...]  # what the group aggregates (as lm-eval's own group YAML)
    # Asked as a generated answer (chat endpoints): lm-eval's generative per-subject YAML where it
    # has one ("{subject}" filled in, relative to lm_eval/tasks), else the multiple-choice YAML
    # turned generative by ``generative_overrides``; see ``generative_task``.
    generative_yaml: str | None = None
    generative_overrides: dict[str, Any] = field(default_factory=dict)

    def stock_yamls(self) -> dict[str, Path]:
        root = lm_eval_tasks_dir()
        return {p.stem.removeprefix(self.task_prefix): p for p in sorted(root.glob(self.task_glob))}

    def stock_config(self, subject: str) -> dict[str, Any]:
        """The subject's task config as lm-eval resolves it (includes followed)."""
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(self.stock_yamls()[subject], resolve_func=False)


# The registry of suites: a new lm-eval multiple-choice benchmark is one entry here.
SUITES: dict[str, Suite] = {
    "mmlu": Suite("mmlu", "mmlu", "mmlu/default/mmlu_*.yaml", "mmlu_", ("acc",),
                  generative_yaml="mmlu/generative/mmlu_{subject}.yaml"),
    # lm-eval 0.4.13 has no generative C-Eval: its multiple-choice YAML asks for the letter instead,
    # scored as lm-eval's generative MMLU scores it (exact match, case and punctuation ignored).
    "ceval": Suite("ceval", "ceval-valid", "ceval/ceval-valid_*.yaml", "ceval-valid_",
                   ("acc", "acc_norm"), generative_overrides={
                       "output_type": "generate_until", "doc_to_choice": None, "doc_to_target": "{{answer}}",
                       "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                        "ignore_case": True, "ignore_punctuation": True}]}),
}

# The answer letter in a chat reply, as lm-eval's ``regex`` filter applies it (the first match in
# the reply; "[invalid]" when none, counted as an extraction failure): a reply that starts with the
# letter ("B", "(B)", "B. Paris", "B:"), or that names it after "answer" / "答案" ("The answer is B",
# "答案：C"). A reply that starts with a word ("A good answer ...") is not read as "A".
ANSWER_PATTERN = (r"^\s*[(\[]?([A-D])(?=\s*$|\s*\n|[.)\]:：,，、])"
                  r"|(?:[Aa]nswer|ANSWER|答案)(?:\s*(?:is|is:|:|：|是|为|為))?\s*[:：]?\s*[(\[]?([A-D])(?![A-Za-z])")
INVALID = "[invalid]"  # lm-eval's fallback for a reply with no answer letter
GENERATIVE_METRICS = ("exact_match",)


def generative_task(suite: Suite, subject: str, max_tokens: int) -> dict[str, Any]:
    """The keys that make ``subject`` a generated-answer task: lm-eval's own generative YAML (or
    the multiple-choice one with ``generative_overrides``), the letter extracted by
    ``ANSWER_PATTERN`` (filter named "none", so results read as ``exact_match,none``), and at most
    ``max_tokens`` generated. Greedy (temperature 0) as lm-eval's generative tasks ask."""
    include = (lm_eval_tasks_dir() / suite.generative_yaml.format(subject=subject) if suite.generative_yaml
               else suite.stock_yamls()[subject])
    return {"include": str(include), **suite.generative_overrides,
            "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": max_tokens, "do_sample": False,
                                  "temperature": 0.0},
            "filter_list": [{"name": "none", "filter": [
                {"function": "regex", "regex_pattern": ANSWER_PATTERN, "group_select": 0, "fallback": INVALID},
                {"function": "take_first"}]}]}


@dataclass
class PreparedSuite:
    """What to ask lm-eval for, and what to say in the report about the data."""

    key: str
    task: str  # the group (or task) name handed to simple_evaluate
    source: dict[str, Any]  # data_fingerprint entry: name, split, sha256, files, location
    subjects: dict[str, str] = field(default_factory=dict)  # subject -> category ("" if none)


def _dump(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 over (path relative to ``root``, file sha256) in sorted order, as tree_fingerprint."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def read_card(root: Path, default: str) -> str:
    card = root / CARD
    if not card.exists():
        return default
    data = json.loads(card.read_text())
    return f"{data['name']} ({data['note']})" if data.get("note") else data["name"]


def split_files(root: Path, subject: str, split: str) -> list[Path]:
    """Files of one subject's split, in the hub layout or C-Eval's zip layout."""
    patterns = (f"{subject}/{split}-*", f"{subject}/{split}.*", f"{split}/{subject}_{split}.*")
    found = {p for pat in patterns for p in root.glob(pat) if p.suffix in FORMATS and p.is_file()}
    return sorted(found)


def _category(cfg: dict) -> str:
    tag = cfg.get("tag") or ""  # mmlu: "mmlu_stem_tasks" -> "stem"; ceval has none
    return tag.removeprefix("mmlu_").removesuffix("_tasks") if isinstance(tag, str) else ""


def _group_yaml(name: str, tasks: list[str], metrics: tuple[str, ...], alias: str | None = None) -> dict:
    cfg: dict[str, Any] = {"group": name}
    if alias:
        cfg["group_alias"] = alias
    cfg["task"] = tasks
    cfg["aggregate_metric_list"] = [
        {"metric": m, "aggregation": "mean", "weight_by_size": True} for m in metrics]
    cfg["metadata"] = {"version": 1}
    return cfg


def prepare_suite(suite: Suite, data_dir: str | None, subjects: list[str] | None,
                  include_dir: Path, generate_tokens: int | None = None) -> PreparedSuite:
    """Write the suite's task YAMLs into ``include_dir``; return what to run and the data's identity.

    ``generate_tokens``: ask each question for a generated answer of at most that many tokens
    (``generative_task``; chat endpoints) instead of scoring the choices' log-likelihoods. The
    tasks keep their names, so a question's id is the same either way."""
    stock = suite.stock_yamls()
    if subjects:
        unknown = sorted(set(subjects) - set(stock))
        if unknown:
            raise EvalDataError(f"{suite.key}: unknown subjects {unknown}; lm-eval's "
                                f"{suite.stock_group} has: {', '.join(stock)}")
    template = suite.stock_config(next(iter(stock)))
    eval_split = template.get("test_split") or template["validation_split"]
    fewshot_split = template["fewshot_split"]

    metrics = suite.metrics if generate_tokens is None else GENERATIVE_METRICS
    if data_dir is None:  # lm-eval's stock task, hub data
        source = {"name": template["dataset_path"], "location": "huggingface hub",
                  "split": eval_split, "fewshot_split": fewshot_split, "sha256": None}
        chosen = subjects or list(stock)
        cats = {s: _category(suite.stock_config(s)) for s in chosen}
        if not subjects and generate_tokens is None:
            return PreparedSuite(suite.key, suite.stock_group, source, cats)
        if generate_tokens is None:
            tasks = {s: suite.task_prefix + s for s in chosen}
        else:  # generated answers: our own per-subject tasks over the hub's rows
            tasks = {s: PREFIX + suite.task_prefix + s for s in chosen}
            for s in chosen:
                _dump(include_dir / f"{tasks[s]}.yaml", {**generative_task(suite, s, generate_tokens),
                                                         "task": tasks[s], "tag": []})
    else:
        root = Path(data_dir).resolve()
        if not root.is_dir():
            raise EvalDataError(f"{suite.key}: data folder {root} does not exist")
        present = [s for s in stock if split_files(root, s, eval_split)]
        chosen = subjects or present
        missing = [s for s in chosen if s not in present]
        if missing or not chosen:
            raise EvalDataError(
                f"{suite.key}: no '{eval_split}' files for {missing or 'any lm-eval subject'} under "
                f"{root} (expected <subject>/{eval_split}-*.parquet|.jsonl|.csv or "
                f"{eval_split}/<subject>_{eval_split}.csv)")
        files, tasks, cats = [], {}, {}
        for s in chosen:
            data_files = {eval_split: split_files(root, s, eval_split),
                          fewshot_split: split_files(root, s, fewshot_split)}
            if not data_files[fewshot_split]:
                data_files.pop(fewshot_split)  # zero-shot still works; few-shot will fail loudly
            exts = {FORMATS[p.suffix] for fs in data_files.values() for p in fs}
            if len(exts) != 1:
                raise EvalDataError(f"{suite.key}/{s}: mixed file formats {sorted(exts)} in {root}")
            files += [p for fs in data_files.values() for p in fs]
            name = PREFIX + suite.task_prefix + s
            how = {"include": str(stock[s])} if generate_tokens is None else generative_task(
                suite, s, generate_tokens)
            _dump(include_dir / f"{name}.yaml", {
                **how,
                "task": name,
                "tag": [],  # not a member of lm-eval's own mmlu_*_tasks tags
                "dataset_path": exts.pop(),
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {k: [str(p) for p in v] for k, v in data_files.items()}},
            })
            tasks[s] = name
            cats[s] = _category(suite.stock_config(s))
        source = {"name": read_card(root, f"local copy of {template['dataset_path']}"),
                  "location": str(root), "split": eval_split, "fewshot_split": fewshot_split,
                  "sha256": files_fingerprint(root, files), "files": len(files)}

    group = PREFIX + suite.stock_group
    by_cat: dict[str, list[str]] = {}
    for s, cat in cats.items():
        by_cat.setdefault(cat, []).append(tasks[s])
    if all(by_cat):  # every subject has a category (mmlu): nest category groups, as lm-eval
        members = []
        for cat, names in sorted(by_cat.items()):
            sub = f"{group}_{cat}"
            _dump(include_dir / f"_{sub}.yaml", _group_yaml(sub, names, metrics, alias=cat))
            members.append(sub)
    else:
        members = [tasks[s] for s in chosen]
    _dump(include_dir / f"_{group}.yaml", _group_yaml(group, members, metrics))
    if generate_tokens is not None:
        source["scoring"] = "generative"  # never compared with log-likelihood scores (stage.SAME_DATA_KEYS)
    return PreparedSuite(suite.key, group, source, cats)


# A blank line: a newline, any whitespace-only lines, a newline (indentation after it stays).
_BLANK_LINES = re.compile(r"\n\s*\n")
CHUNKS_FILE = "perplexity_chunks.jsonl"  # derived documents, written next to the task YAML


def chunk_page(page: str, min_words: int) -> list[str]:
    """Consecutive chunks of ``page``, split at blank lines, each of at least ``min_words`` words
    (``str.split``); the last short remainder joins the previous chunk, so only a page shorter than
    ``min_words`` gives a shorter chunk (itself). Each chunk is the page's text, blank lines between
    chunks dropped."""
    starts, ends = [0], []
    for m in _BLANK_LINES.finditer(page):
        ends.append(m.start())
        starts.append(m.end())
    ends.append(len(page))
    paragraphs = [(a, b) for a, b in zip(starts, ends) if page[a:b].strip()]
    spans: list[list[int]] = []  # [start, end] of each chunk in page
    words = 0
    for a, b in paragraphs:
        if spans and words < min_words:
            spans[-1][1] = b  # the open chunk is still short: extend it
        else:
            spans.append([a, b])
            words = 0
        words += len(page[a:b].split())
    if len(spans) > 1 and words < min_words:  # a short remainder joins the chunk before it
        last = spans.pop()
        spans[-1][1] = last[1]
    return [page[a:b] for a, b in spans]


def prepare_perplexity(data_dir: str | None, include_dir: Path,
                       chunk_words: int | None = None) -> PreparedSuite:
    """lm-eval's wikitext task (rolling log-likelihood; word/byte perplexity, bits per byte) on
    local documents: one JSON object per line with the text in ``page``, as wikitext has it.

    ``chunk_words``: each page is split into chunks of at least that many words (``chunk_page``),
    written as a derived JSONL into ``include_dir`` that the task reads instead; each chunk is one
    document to lm-eval, so the perplexity interval (a bootstrap over documents) has enough of
    them. None: whole pages. The fingerprint names the source files' sha256 with ``chunk_words``
    and the number of ``documents`` scored, so differently chunked runs are never compared."""
    if data_dir is None:
        if chunk_words is not None:
            log.info("perplexity: chunk_words applies to a local data_dir only; the hub's wikitext "
                     "is scored by whole pages")
        return PreparedSuite("perplexity", "wikitext", {
            "name": "EleutherAI/wikitext_document_level wikitext-2-raw-v1",
            "location": "huggingface hub", "split": "test", "sha256": None, "chunk_words": None})
    root = Path(data_dir).resolve()
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise EvalDataError(f"perplexity: no *.jsonl documents in {root}")
    pages = [(p, i, json.loads(line)) for p in files
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if line.strip()]
    if chunk_words is None:
        data_files, docs = [str(p) for p in files], len(pages)
    else:
        # page_id: the page each chunk was cut from, carried into lm-eval's per-sample records
        # (its "doc"), so intervals resample pages, not correlated chunks of one page.
        chunks = [{"page": text, "title": row.get("title"), "source": f"{p.name}:{i}", "page_id": f"{p.name}:{i}",
                   "chunk": j}
                  for p, i, row in pages for j, text in enumerate(chunk_page(row["page"], chunk_words))]
        derived = include_dir / CHUNKS_FILE
        derived.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks),
                           encoding="utf-8")
        data_files, docs = [str(derived)], len(chunks)
    name = PREFIX + "perplexity"
    _dump(include_dir / f"{name}.yaml", {
        "include": str(lm_eval_tasks_dir() / "wikitext" / "wikitext.yaml"),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": data_files}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        # wikitext's detokenizer undoes wikitext's own " @-@ " spacing; plain text needs none.
        "doc_to_target": "{{page}}",
        "should_decontaminate": False,
    })
    source = {"name": read_card(root, f"local documents at {root.name}"), "location": str(root),
              "split": "test", "sha256": files_fingerprint(root, files), "files": len(files),
              "pages": len(pages), "chunk_words": chunk_words, "documents": docs,
              "bytes": sum(p.stat().st_size for p in files)}
    return PreparedSuite("perplexity", name, source)


def strip_name(task: str) -> str:
    return task.removeprefix(PREFIX)
