"""The recommender decides on evidence: crafted candidates with known per-question and
per-document records, and load-test summaries with known SLO verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import stats
from workbench.config import ReportConfig, SLOConfig
from workbench.loadgen.client import Record
from workbench.loadgen.summary import SLOVerdict, columns, rate_summaries, step_summary
from workbench.recommend import Candidate, recommend

CFG = ReportConfig(variants=["base", "awq-int4", "gptq-int4"], accuracy_metric="mmlu_acc")
RNG = np.random.default_rng(7)
WORDS = RNG.integers(60, 140, size=25).astype(float)
BASE_LL = -WORDS * RNG.normal(3.0, 0.3, size=25)  # ~20 perplexity, varied per document


def docs(scale: float, noise: float = 0.0, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per-document (loglik, words): base's log-likelihoods scaled (1.1 = ~35 % higher perplexity)."""
    jitter = np.random.default_rng(seed).normal(0, noise, size=25)
    return {f"d{i}": (float(BASE_LL[i] * (scale + jitter[i])), float(WORDS[i])) for i in range(25)}


def questions(correct: list[int], n: int = 30) -> dict[str, dict[str, bool]]:
    return {"mmlu": {f"q{i}": i in correct for i in range(n)}}


def load(verdict: stats.Verdict = stats.Verdict.undecided):
    recs = [Record(f"r{i}", "s", False, i * 1.0, send_s=i * 1.0, first_token_s=i + 0.1, chunk_s=[i + 0.1, i + 0.2],
                   end_s=i + 0.25, completion_tokens=2, success=True, streamed=True) for i in range(8)]
    step = step_summary("v", "rate_1", 1.0, recs, SLOConfig(), {})
    rate = rate_summaries([step], {0: columns(recs, SLOConfig())}, SLOConfig())[0]
    rate.slo = SLOVerdict.of(verdict, verdict)
    return rate, [250.0 + i for i in range(8)]


def cand(variant: str, mb: float, ll_scale: float, correct: list[int], verdict=stats.Verdict.undecided,
         e2el: list[float] | None = None, noise: float = 0.0, seed: int = 0) -> Candidate:
    d = docs(ll_scale, noise, seed)
    q = questions(correct)
    rate, lat = load(verdict)
    ll, w = zip(*d.values())
    return Candidate(variant=variant, bytes=mb * 1e6, evaluated=True, questions=q, documents=d,
                     ppl=stats.perplexity(ll, w), accuracy={"mmlu": stats.proportion(len(correct), 30)},
                     load=rate, e2el_ms=e2el if e2el is not None else lat)


def test_one_question_in_thirty_is_a_tie_that_goes_to_the_next_criterion():
    # gptq answers one more question than awq, perplexities are the same: the size decides (awq smaller)
    awq = cand("awq-int4", 110, 1.0, list(range(7)), noise=0.01, seed=1)
    gptq = cand("gptq-int4", 130, 1.0, list(range(8)), noise=0.01, seed=2)
    d = recommend([awq, gptq], CFG)
    assert d["variant"] == "awq-int4"
    acc_step = next(s for s in d["steps"] if s["criterion"] == "mmlu accuracy")
    assert acc_step["dropped"] == {} and "within noise" in acc_step["ties"]["awq-int4"]
    assert "McNemar p = 1" in acc_step["ties"]["awq-int4"] and "n = 30" in acc_step["ties"]["awq-int4"]
    assert "size: gptq-int4 dropped" in d["reason"] and "mmlu accuracy: awq-int4 tied" in d["reason"]


def test_perplexity_intervals_that_do_not_overlap_decide_even_against_better_smoke_accuracy():
    awq = cand("awq-int4", 117, 1.05, list(range(7)), noise=0.01, seed=1)  # ~+17 % perplexity
    gptq = cand("gptq-int4", 117, 1.10, list(range(8)), noise=0.01, seed=2)  # ~+35 %, one more question
    d = recommend([awq, gptq], CFG)
    assert d["variant"] == "awq-int4"
    ppl = d["steps"][0]
    assert ppl["criterion"] == "perplexity" and "gptq-int4" in ppl["dropped"]
    assert "%" in ppl["dropped"]["gptq-int4"] and "[" in ppl["dropped"]["gptq-int4"]
    assert "perplexity" in d["reason"] and "[" in d["reason"]


def test_a_significantly_worse_variant_is_never_recommended_even_smaller_and_faster():
    base = cand("base", 270, 1.0, list(range(15)), e2el=[500.0] * 8)
    tiny = cand("gptq-int4", 60, 1.3, list(range(14)), e2el=[100.0] * 8)
    d = recommend([tiny, base], CFG)
    assert d["variant"] == "base"
    assert "gptq-int4" in d["steps"][0]["dropped"]


def test_a_variant_shown_to_fail_the_slo_is_not_eligible_but_undecided_is():
    base = cand("base", 270, 1.0, list(range(15)), verdict=stats.Verdict.failed)
    awq = cand("awq-int4", 117, 1.05, list(range(14)), verdict=stats.Verdict.undecided)
    d = recommend([base, awq], CFG)
    assert d["variant"] == "awq-int4" and "fail the SLO" in d["rejected"]["base"]
    assert d["slo_undecided"] and "undecided" in d["reason"]


def test_nothing_eligible_says_so_with_each_reason():
    base = cand("base", 270, 1.0, [1], verdict=stats.Verdict.failed)
    broken = cand("gptq-int4", 60, 3.0, [1])
    broken.broken = True
    d = recommend([base, broken], CFG)
    assert d["variant"] is None and d["reason"].startswith("no variant qualifies")
    assert "base: shown to fail" in d["reason"] and "gptq-int4: flagged broken" in d["reason"]


def test_memory_budget_excludes_larger_variants():
    base = cand("base", 270, 1.0, list(range(15)))
    awq = cand("awq-int4", 117, 1.05, list(range(14)))
    d = recommend([base, awq], CFG.model_copy(update={"memory_budget_bytes": 200e6}))
    assert d["variant"] == "awq-int4" and "budget" in d["rejected"]["base"]


def test_speed_decides_only_without_drift():
    a = cand("awq-int4", 117, 1.0, list(range(7)), e2el=list(np.linspace(900, 1000, 16)), noise=0.01, seed=1)
    g = cand("gptq-int4", 117, 1.0, list(range(7)), e2el=list(np.linspace(300, 400, 16)), noise=0.01, seed=2)
    assert recommend([a, g], CFG)["variant"] == "gptq-int4"
    drifted = recommend([a, g], CFG, drifted=True)
    assert drifted["variant"] == "awq-int4" and drifted["tied_with"] == ["gptq-int4"]
    assert "drift" in drifted["reason"] and "report.variants" in drifted["reason"]


def test_a_tie_on_everything_says_how_many_questions_would_resolve_it():
    a = cand("awq-int4", 117, 1.0, list(range(9)), noise=0.01, seed=1)
    g = cand("gptq-int4", 117, 1.0, list(range(11)), noise=0.01, seed=2)
    d = recommend([g, a], CFG.model_copy(update={"variants": ["gptq-int4", "awq-int4"]}))
    acc = next(s for s in d["steps"] if s["criterion"] == "mmlu accuracy")
    assert "questions would resolve it" in acc["ties"]["awq-int4"]


@pytest.mark.parametrize("first", ["awq-int4", "gptq-int4"])
def test_the_decision_does_not_depend_on_the_order_candidates_arrive_in(first):
    awq = cand("awq-int4", 117, 1.05, list(range(7)), noise=0.01, seed=1)
    gptq = cand("gptq-int4", 117, 1.10, list(range(8)), noise=0.01, seed=2)
    pair = [awq, gptq] if first == "awq-int4" else [gptq, awq]
    assert recommend(pair, CFG)["variant"] == "awq-int4"
