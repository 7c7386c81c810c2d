"""The report stage: tables, recommendation, HTML, dvc metrics, and the MLflow UI in a browser.

Stage reports of two variants are written by hand here (the seam); everything downstream of them
is the real code: the report stage through papermill, nbconvert, MLflow server, headless Chromium.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from workbench import report as report_stage
from workbench.config import ReportConfig
from workbench.reports import Report, write_report
from workbench.serve import free_port, wait_http_ok

ROWS = {  # offered -> (TTFT p50, TTFT p99, goodput)
    "base": {0.5: (180, 300, 1.0), 1.0: (190, 320, 0.95), 2.0: (400, 2500, 0.4)},
    "gptq-int4": {0.5: (150, 250, 1.0), 1.0: (160, 280, 0.97), 2.0: (300, 1800, 0.6)},
}
ACC = {"base": (0.40, 20.0), "gptq-int4": (0.38, 21.0)}  # mmlu_acc, ppl_word


def load_row(rate, p50, p99, goodput):
    return {"offered req/s": rate, "achieved req/s": rate, "throughput req/s": rate,
            "TTFT p50 ms": p50, "TTFT p99 ms": p99, "E2EL mean ms": 3 * p50, "E2EL p99 ms": 3 * p99,
            "goodput": goodput, "errors": 0, "utilization %": 50.0, "utilization of": "cpu"}


def write_stage_reports(acc=ACC, rows=ROWS):
    write_report(Report(stage="prepare", variant="base", config={}, metrics={"model_bytes": 270e6}))
    for v, (mmlu, ppl) in acc.items():
        write_report(Report(stage="evaluate", variant=v, config={},
                            metrics={"mmlu_acc": mmlu, "ceval_acc": mmlu / 2, "ppl_word": ppl}))
        write_report(Report(stage="loadtest", variant=v, config={},
                            metrics={"max_output_tokens_per_s": 40.0},
                            details={"table": [load_row(r, *x) for r, x in rows[v].items()]}))
        if v != "base":
            write_report(Report(stage="quantize", variant=v, config={}, metrics={"model_bytes": 90e6},
                                details={"method": "gptq"}))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_recommends_best_accuracy_that_meets_slos(in_tmp):
    write_stage_reports()
    r = report_stage.run(ReportConfig(variants=["base", "gptq-int4"], target_rate_req_per_s=1.0))
    assert r.details["recommendation"]["variant"] == "base"
    assert "best mmlu_acc (0.400)" in r.details["recommendation"]["reason"]
    q = {row["variant"]: row for row in r.details["quantization_table"]}
    assert math.isclose(q["gptq-int4"]["compression"], 3.0)
    assert math.isclose(q["gptq-int4"]["ppl_change_pct"], 5.0)
    assert json.loads(Path("metrics.json").read_text())["recommended"] == "base"


def test_memory_budget_moves_the_choice_to_the_smaller_variant(in_tmp):
    write_stage_reports()
    r = report_stage.run(ReportConfig(variants=["base", "gptq-int4"], memory_budget_bytes=100e6))
    rec = r.details["recommendation"]
    assert rec["variant"] == "gptq-int4"
    assert "exceeds the 100 MB budget" in rec["rejected"]["base"]


def test_no_variant_meeting_the_slos_is_said_plainly(in_tmp):
    write_stage_reports()
    r = report_stage.run(ReportConfig(variants=["base", "gptq-int4"], target_rate_req_per_s=2.0))
    rec = r.details["recommendation"]
    assert rec["variant"] is None and rec["reason"].startswith("no variant qualifies")
    assert "goodput 40%" in rec["rejected"]["base"]


def test_perplexity_more_than_doubled_is_flagged_broken_not_ranked(in_tmp):
    write_stage_reports(acc={"base": (0.40, 20.0), "gptq-int4": (0.90, 45.0)})
    r = report_stage.run(ReportConfig(variants=["base", "gptq-int4"]))
    q = {row["variant"]: row for row in r.details["quantization_table"]}
    assert q["gptq-int4"]["broken"] and not q["base"]["broken"]
    assert r.details["recommendation"]["variant"] == "base"  # despite gptq's higher accuracy


@pytest.mark.integration
def test_report_notebook_html_has_both_tables_and_plots_and_mlflow_ui_shows_variants(project):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        write_stage_reports()
    finally:
        os.chdir(cwd)
    (project / "params.yaml").write_text("report:\n  variants: [base, gptq-int4]\n")
    out = subprocess.run([sys.executable, "-m", "pipelines.run_stage", "report"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    html = (project / "reports/report/report.html").read_text()
    assert "quantization-table" in html and "load-table" in html
    assert html.count("data:image/png;base64") >= 3  # accuracy vs size, latency vs rate, TTFT CDF
    assert "Recommendation" in html and "gptq-int4" in html
    metrics = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "metrics.json"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert "mmlu_acc" in metrics.stdout or "mmlu_acc" in metrics.stderr
    browse_mlflow_ui(project, env)


def browse_mlflow_ui(project: Path, env: dict) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (.ci/run installs it with apt-get)"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "ui", "--port", str(port)], cwd=project, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_http_ok(f"{url}/health", 180, server), "workbench ui did not answer /health"
        exp = httpx.get(f"{url}/api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": "llm-workbench"}).json()["experiment"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{url}/#/experiments/{exp['experiment_id']}/runs", wait_until="domcontentloaded")
            page.get_by_text("variant:gptq-int4").first.wait_for(timeout=60_000)
            # Variants share metric keys, so a metric filter in the UI lines them up.
            search = page.get_by_placeholder("metrics.rmse", exact=False).first
            search.fill("metrics.mmlu_acc > 0 and metrics.ttft_ms_p50_at_target > 0")
            search.press("Enter")
            page.wait_for_timeout(3000)
            page.get_by_text("variant:base").first.wait_for(timeout=30_000)
            body = page.inner_text("body")
            page.screenshot(path=str(project / "mlflow-ui.png"))
            browser.close()
        runs = httpx.post(f"{url}/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [exp["experiment_id"]],
            "filter": "tags.`workbench.role` = 'variant'"}).json()["runs"]
        assert sorted(r["info"]["run_name"] for r in runs) == ["variant:base", "variant:gptq-int4"]
        for run in runs:
            keys = {m["key"] for m in run["data"].get("metrics", [])}
            assert {"mmlu_acc", "ttft_ms_p50_at_target"} <= keys, keys
        assert "variant:base" in body and "variant:gptq-int4" in body
        assert "2 matching runs" in body  # only the two variants carry both metrics
    finally:
        server.terminate()
        server.wait(timeout=30)
