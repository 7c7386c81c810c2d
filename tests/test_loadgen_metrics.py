"""The metric definitions, pinned on hand-made records (as vLLM's `vllm bench serve` defines them)."""

import numpy as np
import pytest

from workbench.config import SLOConfig
from workbench.loadgen import metrics as m
from workbench.loadgen.client import Record


def rec(i=0, send=0.0, chunks=(0.1, 0.1, 0.2, 0.3), tokens=3, ok=True, error=None, warmup=False,
        streamed=True, scheduled=None, end=None, content=None):
    chunks = list(chunks)
    return Record(
        request_id=f"r{i}", step="rate_1", warmup=warmup,
        scheduled_s=send if scheduled is None else scheduled, send_s=send,
        first_token_s=(chunks[0] if chunks and streamed else None), chunk_s=chunks if streamed else [],
        end_s=end if end is not None else ((chunks[-1] if chunks else send) + 0.001),
        prompt_tokens=5, completion_tokens=tokens,
        content_chunks=len(chunks) - 1 if content is None else content,
        success=ok, error=error, streamed=streamed)


def test_ttft_is_first_token_chunk_minus_send():
    # Which chunk is "first" is the client's job: see test_ttft_counts_role_only_first_chunk_like_vllm.
    r = rec(send=1.0, chunks=(1.05, 1.08, 1.10), tokens=2, content=2)
    assert m.ttft_s(r) == pytest.approx(0.05)


def test_tpot_of_one_token_reply_is_excluded():
    one = rec(chunks=(0.1, 0.2), tokens=1)
    assert m.tpot_s(one) is None
    out = m.step_metrics([one], 1.0, SLOConfig())
    assert "tpot_ms_mean" not in out and "ttft_ms_mean" in out


def test_tpot_is_latency_minus_ttft_over_tokens_minus_one():
    r = rec(send=0.0, chunks=(0.1, 0.2, 0.3, 0.5), tokens=5)
    assert m.tpot_s(r) == pytest.approx((0.5 - 0.1) / 4)


def test_itl_is_gaps_between_chunks():
    r = rec(chunks=(0.1, 0.15, 0.35, 0.36))
    assert m.itl_s(r) == pytest.approx([0.05, 0.2, 0.01])
    assert m.step_metrics([r], 1.0, SLOConfig())["itl_ms_p50"] == pytest.approx(50.0)


def test_e2el_ends_at_last_token_chunk_not_at_usage_or_done():
    r = rec(send=0.0, chunks=(0.1, 0.2), end=0.9)  # usage / [DONE] arrived late
    assert m.e2el_s(r) == pytest.approx(0.2)


def test_non_streamed_latency_is_until_the_body_is_read():
    r = rec(send=0.0, chunks=(), streamed=False, end=0.4, tokens=8, content=0)
    assert m.e2el_s(r) == pytest.approx(0.4) and m.ttft_s(r) is None and m.tpot_s(r) is None


def test_goodput_counts_requests_meeting_every_slo():
    slo = SLOConfig(ttft_ms=300, e2el_ms=1500)
    good = rec(0, chunks=(0.2, 1.0))
    slow_first = rec(1, chunks=(0.4, 1.0))
    slow_total = rec(2, chunks=(0.2, 1.6))
    failed = rec(3, ok=False, error="http_503", chunks=())
    out = m.step_metrics([good, slow_first, slow_total, failed], 1.0, slo)
    assert out["goodput_fraction"] == pytest.approx(0.25)
    assert out["goodput_req_per_s"] == pytest.approx(1 / out["duration_s"])


def test_slo_exactly_at_the_limit_is_good_as_in_vllm():
    assert m.is_good(rec(chunks=(0.3, 1.5)), SLOConfig(ttft_ms=300, e2el_ms=1500))


def test_tpot_slo_treats_one_token_reply_as_zero():
    assert m.is_good(rec(chunks=(0.1, 0.9), tokens=1), SLOConfig(ttft_ms=None, e2el_ms=None, tpot_ms=1))


def test_non_streamed_request_uses_e2el_as_ttft_for_goodput():
    r = rec(chunks=(), streamed=False, end=0.5, content=0)
    assert not m.is_good(r, SLOConfig(ttft_ms=300, e2el_ms=1500))
    assert m.is_good(r, SLOConfig(ttft_ms=600, e2el_ms=1500))


def test_achieved_rate_is_sends_over_their_span_and_offered_is_the_target():
    rs = [rec(i, send=i * 0.5 + 0.01, scheduled=i * 0.5) for i in range(5)]  # 4 gaps over 2 s
    out = m.step_metrics(rs, 2.0, SLOConfig())
    assert out["offered_req_per_s"] == 2.0
    assert out["achieved_req_per_s"] == pytest.approx(2.0)
    assert out["scheduled_req_per_s"] == pytest.approx(2.0)
    assert out["send_lag_ms_p50"] == pytest.approx(10.0)


def test_throughputs_divide_by_first_arrival_to_last_response():
    rs = [rec(0, send=0.0, chunks=(0.1, 0.9), tokens=4), rec(1, send=0.5, chunks=(0.6, 1.999), tokens=6)]
    out = m.step_metrics(rs, 1.0, SLOConfig())
    assert out["duration_s"] == pytest.approx(2.0)
    assert out["request_throughput_req_per_s"] == pytest.approx(1.0)
    assert out["output_tokens_per_s"] == pytest.approx(5.0)
    assert out["total_tokens_per_s"] == pytest.approx(10.0)


def test_errors_by_kind_counts_each_kind_and_failures_are_not_latency_samples():
    rs = [rec(0), rec(1, ok=False, error="http_503", chunks=()), rec(2, ok=False, error="http_503", chunks=()),
          rec(3, ok=False, error="timeout", chunks=())]
    assert m.errors_by_kind(rs) == {"http_503": 2, "timeout": 1}
    out = m.step_metrics(rs, 1.0, SLOConfig())
    assert out["errors_http_503"] == 2 and out["errors_timeout"] == 1 and out["failed"] == 3
    assert out["completed"] == 1 and out["success_fraction"] == 0.25


def test_warmup_records_are_excluded_from_every_number():
    slow_warm = rec(0, chunks=(5.0, 9.0), warmup=True)
    out = m.step_metrics([slow_warm, rec(1)], 1.0, SLOConfig())
    assert out["requests"] == 1 and out["ttft_ms_p99"] == pytest.approx(100.0)


def test_percentiles_are_numpys_linear_in_ms():
    rs = [rec(i, send=0.0, chunks=(t, t + 0.1)) for i, t in enumerate((0.01, 0.02, 0.03, 0.04, 0.5))]
    out = m.step_metrics(rs, 1.0, SLOConfig())
    ttfts = np.array([0.01, 0.02, 0.03, 0.04, 0.5]) * 1000
    assert out["ttft_ms_p90"] == pytest.approx(np.percentile(ttfts, 90))
    assert out["ttft_ms_mean"] == pytest.approx(ttfts.mean())
    assert {"ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99", "e2el_ms_p99", "itl_ms_p99"} <= set(out)


def test_output_tokens_fall_back_to_content_chunks_without_usage():
    assert m.output_tokens(rec(chunks=(0.1, 0.1, 0.2, 0.3), tokens=None)) == 3


def test_peak_concurrency_counts_overlapping_requests():
    rs = [rec(0, send=0.0, chunks=(0.1, 1.0)), rec(1, send=0.5, chunks=(0.6, 1.2)), rec(2, send=1.5, chunks=(1.6, 1.7))]
    assert m.peak_concurrency(rs) == 2


def test_limiting_factor_blames_the_client_first_then_the_pegged_server_part():
    from workbench.loadgen.probes import limiting_factor as with_slo

    def limiting_factor(m):
        return with_slo(m, SLOConfig().min_goodput)

    assert limiting_factor({"send_lag_ms_p99": 40, "goodput_fraction": 0.5}).startswith("client")
    assert limiting_factor({"goodput_fraction": 1.0}).startswith("none")
    saturated = {"goodput_fraction": 0.4, "server_queue_ms_p99": 900}
    assert limiting_factor({**saturated, "cpu_busiest_pct_api_server": 99,
                            "gpu_util_pct_mean": 95}).startswith("API front-end")
    assert limiting_factor({**saturated, "cpu_busiest_pct_api_server": 40, "gpu_util_pct_mean": 95}) == "GPU: 95 % busy (mean)"
    assert limiting_factor({**saturated, "cpu_busiest_pct_engine_core": 100,
                            "gpu_util_pct_mean": 30}).startswith("engine core: ")
    assert limiting_factor({**saturated, "cpu_busiest_pct_engine_core": 45,
                            "gpu_util_pct_mean": 3}).startswith("engine core starved")
    assert limiting_factor({**saturated, "cpu_busiest_pct_worker": 97,  # vLLM-CPU: no GPU samples
                            "cpu_busiest_pct_engine_core": 30}).startswith("model compute")


def test_gpu_utilization_counts_the_servers_gpu_not_the_idle_ones_beside_it():
    import os
    from types import SimpleNamespace as NS

    from workbench.loadgen.probes import _Utilization

    def nvml(running: dict[int, list[int]]):
        """A stand-in for pynvml on a 4-GPU machine: GPU 1 busy at 80%, the others idle."""
        return NS(nvmlDeviceGetComputeRunningProcesses=lambda h: [NS(pid=p) for p in running.get(h, [])],
                  nvmlDeviceGetUtilizationRates=lambda h: NS(gpu=80 if h == 1 else 0),
                  nvmlDeviceGetMemoryInfo=lambda h: NS(used=(70 if h == 1 else 0) * 2**30))

    def meter(running):
        u = _Utilization.__new__(_Utilization)
        u._nvml, u._server_pid, u._mine = (nvml(running), [0, 1, 2, 3]), os.getpid(), None
        return u

    assert meter({1: [os.getpid()]}).sample() == (80, 70)  # the server's own pid runs on GPU 1
    assert meter({1: [999999]}).sample() == (80, 70)  # host pids (a container): the GPU running anything
    assert meter({}).sample() == (20, 70)  # nothing to match: every GPU, as before


def test_limiting_factor_reads_the_slos_min_goodput_not_its_own():
    from workbench.loadgen.probes import limiting_factor

    step = {"goodput_fraction": 0.85, "cpu_busiest_pct_worker": 97}
    assert limiting_factor(step, 0.8).startswith("none")  # kept up by an 80 % SLO
    assert limiting_factor(step, 0.9).startswith("model compute")  # not by a 90 % one


def test_mean_latencies_carry_a_t_interval_that_brackets_them():
    rs = [rec(i, send=float(i), chunks=(i + 0.1 + 0.01 * i, i + 0.3 + 0.02 * i)) for i in range(10)]
    out = m.step_metrics(rs, 1.0, SLOConfig())
    for name in ("ttft", "e2el"):
        lo, mean, hi = (out[f"{name}_ms_mean{s}"] for s in ("_ci_lo", "", "_ci_hi"))
        assert lo < mean < hi
    ttft = [100 + 10 * i for i in range(10)]
    half = 2.262 * np.std(ttft, ddof=1) / np.sqrt(10)  # t(0.975, 9)
    assert out["ttft_ms_mean_ci_hi"] - out["ttft_ms_mean"] == pytest.approx(half, rel=1e-3)
    assert "e2el_ms_mean_ci_lo" not in m.step_metrics(rs[:1], 1.0, SLOConfig())  # one request: no interval


def test_utilization_mean_comes_with_its_interval_and_sample_count():
    from workbench.loadgen.probes import StepProbe

    class Meter:  # a GPU reading 40, 50, 60, then 50 percent
        source = "gpu"

        def __init__(self):
            self.values = iter([50.0])  # what stop() samples last

        def sample(self):
            return next(self.values), None

    probe = StepProbe(None, 10.0)  # no scrape; the loop would wait 10 s: samples come from stop()
    probe._meter = Meter()
    probe._util = [40.0, 50.0, 60.0]
    out = probe.stop()
    assert out["gpu_util_samples"] == 4 and out["gpu_util_pct_mean"] == pytest.approx(50.0)
    assert out["gpu_util_pct_mean_ci_lo"] < 50.0 < out["gpu_util_pct_mean_ci_hi"]


def test_tpot_of_a_reply_coalesced_into_its_first_chunk_is_unobserved_not_zero():
    # 8 tokens, all in the first token's chunk: no decode was seen, so no TPOT (not 0 ms).
    coalesced = rec(send=0.0, chunks=(0.2,), tokens=8, content=1)
    assert m.tpot_s(coalesced) is None
    assert m.is_good(coalesced, SLOConfig(ttft_ms=300, e2el_ms=None, tpot_ms=1))  # as vLLM: no TPOT to fail
    seen = rec(1, send=0.0, chunks=(0.1, 0.5), tokens=5)
    out = m.step_metrics([coalesced, seen], 1.0, SLOConfig())
    assert out["tpot_ms_p50"] == pytest.approx(100.0)  # the seen one alone
    from workbench.loadgen.summary import columns
    assert columns([coalesced, seen], SLOConfig()).tpot_ms.tolist() == pytest.approx([100.0])
