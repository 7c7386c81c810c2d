"""Generated workloads (workbench/loadgen/synth.py): lengths, uniqueness, determinism, sharing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from workbench.config import LoadtestConfig, WorkloadConfig
from workbench.loadgen import synth, workloads
from workbench.loadtest.step import step_requests

GPU = dict(length_scale=1.0, max_input_tokens=None, max_tokens=None)  # the unscaled distributions


def draw(n=2000, seed=(0, 0, 0), **kw):
    cfg = WorkloadConfig(**kw)
    return workloads.sample(workloads.load(cfg, np.random.default_rng(0)), n, np.random.default_rng(list(seed)))


def words(spec) -> int:
    return len(spec.prompt.split())


def test_sharegpt_shaped_lengths_follow_the_published_means_and_the_lognormal_shape():
    specs = draw(**GPU)
    prompts = np.array([words(s) for s in specs])
    replies = np.array([s.max_tokens for s in specs])
    assert prompts.mean() == pytest.approx(161.31, rel=0.1)  # vLLM paper: ShareGPT prompts
    assert replies.mean() == pytest.approx(337.99, rel=0.1)  # and replies
    cfg = WorkloadConfig(**GPU)
    for x, mean, sigma in ((prompts[prompts > 10], cfg.prompt_mean_tokens, cfg.prompt_sigma),
                           (replies[replies > 10], cfg.reply_mean_tokens, cfg.reply_sigma)):
        mu = math.log(mean) - sigma ** 2 / 2
        lo = sps.lognorm.cdf(10.5, sigma, scale=math.exp(mu))  # compare above the rounding-heavy bottom
        cdf = lambda v: (sps.lognorm.cdf(v, sigma, scale=math.exp(mu)) - lo) / (1 - lo)  # noqa: E731
        assert sps.kstest(x, cdf).pvalue > 0.001


def test_length_scale_and_caps_shrink_the_workload_for_the_cpu():
    specs = draw()  # the CPU default: scale 0.1, replies capped at 64, prompts at 1024
    replies = np.array([s.max_tokens for s in specs])
    assert replies.max() == 64 and 0.05 < (replies == 64).mean() < 0.2
    assert np.median(replies) == pytest.approx(33.8 * math.exp(-0.32), rel=0.15)  # median = mean e^(-s^2/2)
    assert np.mean([words(s) for s in specs]) == pytest.approx(16.1, rel=0.15)


def test_every_request_of_a_run_gets_its_own_prompt():
    cfg = LoadtestConfig(base_url="http://x/v1", requests_per_step=400, warmup_requests=2)
    w = workloads.load(cfg.workload, np.random.default_rng(cfg.seed))
    prompts = [s.prompt for step in range(3) for repeat in range(2)
               for s in step_requests(cfg, w, step, 1.0, repeat)[0]]
    assert len(prompts) == 6 * 402 and len(set(prompts)) == len(prompts)
    # unique from the first words on: no two prompts share their opening tag
    assert len({" ".join(p.split()[:synth.TAG_WORDS]) for p in prompts[:402]}) == 402


def test_requests_are_identical_for_every_arm_at_one_step_and_repeat():
    cfg = LoadtestConfig(base_url="http://x/v1", requests_per_step=20)
    w = workloads.load(cfg.workload, np.random.default_rng(cfg.seed))
    a, b = step_requests(cfg, w, 2, 1.0, 1), step_requests(cfg, w, 2, 1.0, 1)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert step_requests(cfg, w, 2, 1.0, 0)[0] != a[0]  # another repeat: other prompts
    assert step_requests(cfg, w, 3, 1.0, 1)[0] != a[0]  # another step too


def test_shared_prefix_groups_share_their_preamble_and_differ_after_it():
    specs = draw(n=24, kind="shared-prefix", prefix_tokens=50, prefix_group_size=8)
    heads = [s.prompt.split("\n\n")[0] for s in specs]
    assert all(len(h.split()) == 50 for h in heads)
    assert len(set(heads[:8])) == 1 and len(set(heads)) == 3  # three groups of eight
    assert len({s.prompt for s in specs}) == 24
    assert all(s.prompt_tokens_est >= 50 + synth.MIN_PROMPT_TOKENS for s in specs)


def test_long_context_prompts_have_the_configured_length():
    specs = draw(n=5, kind="long-context", long_context_tokens=1536)
    assert all(words(s) == 1536 for s in specs) and len({s.prompt for s in specs}) == 5
    gpu = draw(n=2, kind="long-context", long_context_tokens=32000, max_input_tokens=None)
    assert all(words(s) == 32000 for s in gpu)


def test_long_context_that_cannot_fit_the_managed_server_names_the_keys():
    with pytest.raises(ValueError, match="long_context_tokens"):
        LoadtestConfig(workload=WorkloadConfig(kind="long-context", long_context_tokens=4000))


def test_unique_false_re_samples_a_fixed_pool():
    specs = draw(n=2000, unique=False)
    assert len({s.prompt for s in specs}) <= synth.POOL


def test_file_kinds_need_a_path():
    with pytest.raises(ValueError, match="workload.path"):
        WorkloadConfig(kind="jsonl")
