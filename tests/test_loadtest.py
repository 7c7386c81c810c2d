"""The loadtest stage end to end against the fake server, and the lines it must not cross."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import loadtest
from workbench.config import ConfigError, LoadtestConfig, load_params
from workbench.fakeserver import FakeServer
from workbench.reports import read_report

ROOT = Path(__file__).resolve().parents[1]


def test_loadtest_imports_no_vllm_torch_or_lm_eval():
    code = ("import sys, workbench.loadtest, workbench.loadgen.__main__, workbench.fakeserver; "
            "bad = [m for m in ('vllm', 'torch', 'lm_eval', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    (tmp_path / "data/workloads").mkdir(parents=True)
    shutil.copy(ROOT / "data/workloads/smoke.sharegpt.json", tmp_path / "data/workloads")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_writes_report_records_table_and_plots(in_tmp):
    with FakeServer(ttft_ms=20, itl_ms=2, output_tokens=8, model="fake", fail_every=7) as fake:
        cfg = LoadtestConfig(base_url=fake.base_url, model="fake", rates=[10, 40], requests_per_step=12,
                             warmup_requests=2)
        report = loadtest.run(cfg, variant="v1")
    saved = read_report(in_tmp / "reports/loadtest/v1.json")
    assert saved.stage == "loadtest" and saved.variant == "v1" and saved.metrics == report.metrics
    m = saved.metrics
    for step in ("rate_10", "rate_40"):
        assert m[f"{step}.requests"] == 12  # warm-up excluded
        assert m[f"{step}.ttft_ms_p50"] >= 20
        assert f"{step}.e2el_ms_p99" in m and f"{step}.goodput_fraction" in m
        assert f"{step}.server_ttft_ms_p50" in m  # from the fake's /metrics
        assert f"{step}.cpu_util_pct_mean" in m or f"{step}.gpu_util_pct_mean" in m
    assert m["errors_total"] == m["rate_10.errors_http_503"] + m["rate_40.errors_http_503"] > 0
    assert m["slo_rate_req_per_s"] == 0.0  # every 7th request fails: attainment < 90% at both rates
    lines = (in_tmp / "runs/loadtest/v1/step-40.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 14 and first["warmup"] is True
    assert {"scheduled_s", "send_s", "first_token_s", "chunk_s", "end_s", "prompt_tokens",
            "completion_tokens", "success", "error", "http_status"} <= set(first)
    table = (in_tmp / "runs/loadtest/v1/summary.md").read_text()
    assert table.startswith("| offered req/s | achieved req/s") and table.count("\n") == 4
    for name in ("summary.csv", "latency_vs_rate.png", "ttft_cdf.png"):
        assert (in_tmp / "runs/loadtest/v1" / name).stat().st_size > 0
    assert set(saved.outputs) >= {"records_rate_10", "records_rate_40", "summary_csv", "latency_vs_rate"}
    assert [s["label"] for s in saved.details["steps"]] == ["rate_10", "rate_40"]
    assert "sha256" in saved.data_fingerprint["workload"]


def test_stage_runs_inside_a_running_event_loop_as_in_a_notebook(in_tmp):
    import asyncio

    async def notebook_cell():
        with FakeServer(model="fake") as fake:
            return loadtest.run(LoadtestConfig(base_url=fake.base_url, model="fake", rates=[50],
                                               requests_per_step=3, warmup_requests=0, scrape_metrics=False))

    report = asyncio.run(notebook_cell())
    assert report.metrics["rate_50.completed"] == 3


def test_track_logs_one_nested_run_per_step(in_tmp, monkeypatch):
    from workbench import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = loadtest.Report(stage="loadtest", variant="base", config={}, metrics={"slo_rate_req_per_s": 1.0},
                             details={"steps": [
                                 {"label": "rate_1", "offered_req_per_s": 1.0, "metrics": {"ttft_ms_p50": 5.0}},
                                 {"label": "rate_2", "offered_req_per_s": 2.0, "metrics": {"ttft_ms_p50": 9.0}}]})
    with tracking.stage_run("loadtest", "base", system_metrics=False) as run:
        run.log_report(report)
        loadtest.track(run, report)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(in_tmp))
    exp = client.get_experiment_by_name("llm-workbench")
    children = client.search_runs([exp.experiment_id], "tags.`workbench.role` = 'child'")
    assert sorted(c.info.run_name for c in children) == ["loadtest:base:rate_1", "loadtest:base:rate_2"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {run.run_id}
    assert {c.data.metrics["ttft_ms_p50"] for c in children} == {5.0, 9.0}


def test_track_without_mlflow_is_silent():
    from workbench.tracking import StageRun

    loadtest.track(StageRun(), loadtest.Report(stage="loadtest", variant="b", config={},
                                               details={"steps": [{"label": "rate_1", "offered_req_per_s": 1,
                                                                   "metrics": {}}]}))


def test_default_loadtest_is_small_enough_for_two_cpu_cores():
    cfg = load_params(ROOT / "params.yaml").loadtest
    assert max(cfg.rates) <= 2 and cfg.requests_per_step <= 15 and cfg.warmup_requests == 2
    assert cfg.workload.max_tokens == 32 and cfg.base_url is None  # a managed vLLM by default
    assert cfg.slo.ttft_ms == 300 and cfg.slo.e2el_ms == 1500
    assert cfg == LoadtestConfig()  # params.yaml restates the defaults


def test_unknown_loadtest_key_names_the_key():
    with pytest.raises(ConfigError, match=r"loadtest.slo.ttft\b.*did you mean 'ttft_ms'"):
        load_params(ROOT / "params.yaml", ["loadtest.slo.ttft=100"])


def test_managed_server_defaults_to_serve_chat_unless_given():
    assert load_params(ROOT / "params.yaml", ["serve.chat.model_dir=models/awq"]).loadtest.server.model_dir == "models/awq"
    own = load_params(ROOT / "params.yaml", ["serve.chat.model_dir=models/awq", "loadtest.server.model_dir=models/gptq"])
    assert own.loadtest.server.model_dir == "models/gptq"


def test_managed_server_serves_the_variants_folder():
    cfg = LoadtestConfig()
    assert loadtest.server_config(cfg, "awq-int4").model_dir == "models/awq-int4"
    assert loadtest.server_config(cfg.model_copy(update={"model_dir": "/m/x"}), "awq-int4").model_dir == "/m/x"


def test_via_gateway_routes_every_request_through_it_and_audits_them(in_tmp):
    import sqlite3

    for rel in ("deploy/gateway.yaml", "data/gateway/sensitive_words.en.txt",
                "data/gateway/sensitive_words.zh.txt"):
        (in_tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, in_tmp / rel)
    with FakeServer(ttft_ms=5, itl_ms=1, output_tokens=8, model="fake") as fake:
        cfg = LoadtestConfig(base_url=fake.base_url, model="fake", rates=[20], requests_per_step=10,
                             warmup_requests=1, via_gateway=True)
        report = loadtest.run(cfg, variant="gw")
    assert report.metrics["rate_20.completed"] == 10 and report.metrics["rate_20.failed"] == 0
    assert report.details["server"]["via_gateway"].endswith("/v1")
    assert report.metrics["rate_20.server_ttft_ms_p50"] > 0  # /metrics still read from the upstream
    db = sqlite3.connect(in_tmp / "runs/loadtest/gw/gateway-audit.sqlite")
    rows = db.execute("select count(*) from audit where route like '%chat/completions'").fetchone()[0]
    assert rows == 11  # warm-up included: the gateway saw every request, with the one-off key


def test_variant_vllm_cannot_serve_gets_a_not_servable_report(tmp_path, monkeypatch):
    import contextlib

    from workbench import loadtest
    from workbench.config import LoadtestConfig
    from workbench.serve import ServerError

    @contextlib.contextmanager
    def failing(cfg, variant, log_dir):
        raise ServerError("vLLM exited with code 1: no attribute 'cpu_gemm_wna16'")
        yield

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loadtest, "endpoint", failing)
    report = loadtest.run(LoadtestConfig(out_dir=str(tmp_path / "runs")), variant="awq-int4")
    assert "could not be served" in report.details["not_servable"]
    assert "cpu_gemm_wna16" in report.details["server"]["error"]
    assert report.details["steps"] == [] and loadtest.summary(report).empty
    assert (tmp_path / "reports/loadtest/awq-int4.json").exists()
