"""``python -m workbench.loadgen``: the stage's config (params.yaml's loadtest section plus --set)
on the stage's one executor, against the fake server; and the concurrency mode end to end."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench import loadtest
from workbench.config import LoadtestConfig
from workbench.loadgen import __main__ as cli
from workbench.reports import read_report
from workbench.testing.fakeserver import FakeServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    (tmp_path / "data/workloads").mkdir(parents=True)
    shutil.copy(ROOT / "data/workloads/smoke.sharegpt.json", tmp_path / "data/workloads")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_runs_the_stages_executor_on_params_yaml_with_set_overrides(in_tmp, capsys):
    params = yaml.safe_load((in_tmp / "params.yaml").read_text())
    assert params["loadtest"]["warmup_requests"] == 2  # the stage's default, which the CLI now shares
    with FakeServer(ttft_ms=5, itl_ms=1, output_tokens=4, model="fake") as fake:
        rc = cli.main(["--set", f"base_url={fake.base_url}", "--set", "loadtest.model=fake",
                       "--set", "rates=[20]", "--set", "repeats=2", "--set", "requests_per_step=3",
                       "--set", "scrape_metrics=false", "--set", "window=schedule"])
    assert rc == 0
    steps = json.loads(capsys.readouterr().out)
    assert [s["label"] for s in steps] == ["rate_20", "rate_20-r1"] and all(s["requests"] == 3 for s in steps)
    report = read_report(in_tmp / "reports/loadtest/endpoint.json")  # the stage's report, the stage's path
    assert report.config["warmup_requests"] == 2 and report.config["repeats"] == 2
    records = (in_tmp / "runs/loadtest/endpoint/step-20.jsonl").read_text().splitlines()
    assert len(records) == 3 + 2  # params.yaml's 2 warm-up requests, not the old CLI's 0


def test_cli_names_an_unknown_key(in_tmp, capsys):
    assert cli.main(["--set", "ratez=[1]"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'loadtest.ratez'" in err and "did you mean 'rates'" in err


def test_cli_has_no_flags_of_its_own_for_the_loads_settings():
    out = subprocess.run([sys.executable, "-m", "workbench.loadgen", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "--set" in out.stdout
    assert "--rate" not in out.stdout and "--requests" not in out.stdout and "--warmup" not in out.stdout


def test_runner_sweep_loop_is_gone():
    assert not (ROOT / "workbench/loadgen/runner.py").exists()
    import workbench.loadgen.procs as procs  # imports the client only: no procs <-> runner cycle

    assert "runner" not in Path(procs.__file__).read_text()


def test_concurrency_mode_keeps_at_most_n_requests_in_flight(in_tmp):
    with FakeServer(ttft_ms=20, itl_ms=2, output_tokens=4, model="fake") as fake:
        cfg = LoadtestConfig(window="schedule", base_url=fake.base_url, model="fake", mode="concurrency", concurrencies=[1, 4],
                             requests_per_step=12, warmup_requests=0, repeats=1, scrape_metrics=False)
        report = loadtest.run(cfg, variant="v")
    steps = {s.label: s for s in loadtest.steps_of(report)}
    assert set(steps) == {"conc_1", "conc_4"} and steps["conc_4"].concurrency == 4
    assert all(math.isinf(s.offered_req_per_s) for s in steps.values())
    metrics = report.details["step_metrics"]
    assert metrics["conc_1"]["peak_concurrency"] == 1 and metrics["conc_4"]["peak_concurrency"] == 4
    assert "send_lag_ms_p99" not in metrics["conc_4"] and "slot_wait_ms_p99" in metrics["conc_4"]
    assert metrics["conc_4"]["achieved_req_per_s"] > 2 * metrics["conc_1"]["achieved_req_per_s"]
    rates = {r.concurrency: r for r in loadtest.rates_of(report)}
    assert set(rates) == {1, 4}  # one row per concurrency, not pooled as one infinite rate
    assert "conc_4.ttft_ms_p50" in report.metrics
    assert (in_tmp / "runs/loadtest/v/step-conc_4.jsonl").exists()


def test_a_closed_loop_step_fills_its_batch_before_measuring_and_measures_several_batches(in_tmp):
    # seen on an H100: steps of 8 requests at 64 and 256 in flight never filled the batch they named
    with FakeServer(ttft_ms=5, itl_ms=1, output_tokens=2, model="fake") as fake:
        cfg = LoadtestConfig(window="schedule", base_url=fake.base_url, model="fake", mode="concurrency",
                             concurrencies=[16], requests_per_step=8, warmup_requests=2, repeats=1,
                             scrape_metrics=False)
        report = loadtest.run(cfg, variant="v")
    m = report.details["step_metrics"]["conc_16"]
    assert m["requests"] == 4 * 16 and m["peak_concurrency"] == 16  # measured: 4 batches' worth
    records = loadtest.read_records(report.outputs["records_conc_16"])
    assert sum(r.warmup for r in records) == 16  # warm-up: one full batch, not warmup_requests
