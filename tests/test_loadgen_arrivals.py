"""Arrival processes and workloads: what is sent, and when."""

import json

import numpy as np
import pytest

from workbench.config import LoadtestConfig, WorkloadConfig
from workbench.loadgen import arrivals, workloads
from workbench.loadtest.step import step_requests

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def gaps(kind, rate=10.0, n=20000, seed=0, burstiness=1.0):
    return np.diff(arrivals.schedule(kind, rate, np.random.default_rng(seed), n=n, burstiness=burstiness))


def test_poisson_schedule_is_seeded_and_has_the_target_mean_rate():
    a = arrivals.schedule("poisson", 10.0, np.random.default_rng(7), n=50)
    b = arrivals.schedule("poisson", 10.0, np.random.default_rng(7), n=50)
    assert np.array_equal(a, b) and a[0] == 0 and np.all(np.diff(a) >= 0)
    g = gaps("poisson")
    assert g.mean() == pytest.approx(0.1, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


def test_constant_schedule_is_evenly_spaced():
    assert np.allclose(gaps("constant", rate=4.0, n=5), 0.25)


def test_bursty_gaps_keep_the_rate_but_vary_more_than_poisson():
    g = gaps("bursty", burstiness=0.25)
    assert g.mean() == pytest.approx(0.1, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(2.0, rel=0.1)  # gamma: CV 1/sqrt(shape)


def test_duration_bounded_schedule_stays_inside_the_duration():
    s = arrivals.schedule("poisson", 50.0, np.random.default_rng(1), duration_s=4.0)
    assert s.max() < 4.0 and 150 < len(s) < 250


def test_infinite_rate_sends_everything_at_once():
    assert np.array_equal(arrivals.schedule("poisson", float("inf"), np.random.default_rng(0), n=5), np.zeros(5))


def test_unknown_arrival_process_names_the_known_ones():
    with pytest.raises(ValueError, match="poisson"):
        arrivals.schedule("weibull", 1.0, np.random.default_rng(0), n=3)


def test_step_requests_put_warmup_first_and_differ_between_steps():
    cfg = LoadtestConfig(base_url="http://x/v1", requests_per_step=5, warmup_requests=2)
    specs = workloads.load(cfg.workload, np.random.default_rng(0))
    reqs0, off0 = step_requests(cfg, specs, 0, 2.0)
    reqs1, off1 = step_requests(cfg, specs, 1, 2.0)
    assert len(reqs0) == len(off0) == 7 and not np.array_equal(off0, off1)
    again = step_requests(cfg, specs, 0, 2.0)
    assert again[0] == reqs0 and np.array_equal(again[1], off0)  # reproducible per (seed, step)
    cfg_d = cfg.model_copy(update={"duration_s": 3.0})
    _, off = step_requests(cfg_d, specs, 0, 5.0)
    assert off[2] < 4.0 and off[-1] - off[2] < 3.0  # 2 warm-up arrivals, then 3 s of arrivals


def test_sharegpt_prompt_is_first_human_turn_and_target_is_the_gpt_reply_length(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "Hi there"},
                           {"from": "gpt", "value": "one two three four five six"},
                           {"from": "human", "value": "later turn"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "no reply"}]}]))
    [spec] = workloads.load(WorkloadConfig(kind="sharegpt", path=str(path), max_tokens=None),
                            np.random.default_rng(0))
    assert spec.prompt == "Hi there" and spec.max_tokens == 8  # 6 words * 4/3


def test_max_tokens_caps_the_output_target(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a", "max_tokens": 500}\n\n{"prompt": "b"}\n')
    specs = workloads.load(WorkloadConfig(kind="jsonl", path=str(path), max_tokens=32, output_tokens=10),
                           np.random.default_rng(0))
    assert [(s.prompt, s.max_tokens) for s in specs] == [("a", 32), ("b", 10)]


def test_jsonl_line_without_prompt_names_the_line(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=":2:"):
        workloads.load(WorkloadConfig(kind="jsonl", path=str(path)), np.random.default_rng(0))


def test_synthetic_prompts_have_the_requested_word_count():
    w = workloads.load(WorkloadConfig(kind="synthetic", path=None, input_tokens=40, output_tokens=7,
                                      max_tokens=None), np.random.default_rng(0))
    specs = workloads.sample(w, 300, np.random.default_rng(1))
    assert all(len(s.prompt.split()) == 40 and s.max_tokens == 7 for s in specs)
    assert len({s.prompt for s in specs}) == len(specs)


def test_approx_tokens_counts_each_cjk_character():
    assert workloads.approx_tokens("北京") == 2
    assert workloads.approx_tokens("one two three") == 4


def test_sample_cycles_through_the_whole_workload():
    specs = [workloads.RequestSpec(str(i), 1, 1) for i in range(4)]
    out = workloads.sample(specs, 8, np.random.default_rng(0))
    assert sorted(s.prompt for s in out[:4]) == ["0", "1", "2", "3"] and len(out) == 8


def test_smoke_workload_is_labelled_and_loads_forty_conversations():
    path = ROOT / "data/workloads/smoke.sharegpt.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert "written for LLM Workbench" in doc["README"]
    specs = workloads.load(WorkloadConfig(kind="sharegpt", path=str(path), max_tokens=32), np.random.default_rng(0))
    assert len(specs) == 40
    assert any("\u4e00" <= ch <= "\u9fff" for s in specs for ch in s.prompt)
    assert all(1 <= s.max_tokens <= 32 for s in specs)
