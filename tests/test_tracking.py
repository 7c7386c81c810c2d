import logging

from workbench import tracking
from workbench.reports import Report, write_report


def small_report():
    return Report(stage="prepare", variant="base", config={"dtype": "bfloat16", "model": {"name": "m"}},
                  metrics={"parameters": 3.0})


def test_mlflow_down_costs_a_warning_never_the_result(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING)
    with tracking.stage_run("prepare", "base", system_metrics=False) as run:
        report = small_report()
        path = write_report(report)
        run.log_report(report)
    assert not run.active
    assert path.exists()
    assert any("MLflow unavailable" in r.message for r in caplog.records)


def test_stage_run_logs_params_metrics_report_under_variant_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "nb.ipynb").write_text("{}")
    for _ in range(2):
        with tracking.stage_run("prepare", "base", system_metrics=False) as run:
            run.log_report(small_report(), artifacts=[tmp_path / "nb.ipynb"])
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("llm-workbench")
    runs = client.search_runs([exp.experiment_id], "tags.`workbench.role` = 'stage'")
    parents = client.search_runs([exp.experiment_id], "tags.`workbench.role` = 'variant'")
    assert len(runs) == 2 and len(parents) == 1  # one parent per variant, reused
    r = runs[0]
    assert r.info.run_name == "prepare:base" and r.info.status == "FINISHED"
    assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert r.data.params["prepare.model.name"] == "m"
    assert r.data.metrics["parameters"] == 3.0
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"report.json", "nb.ipynb"}
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in cwd/mlruns


def test_failed_stage_marks_the_run_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        with tracking.stage_run("prepare", "base", system_metrics=False):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("llm-workbench")
    [r] = client.search_runs([exp.experiment_id], "tags.`workbench.role` = 'stage'")
    assert r.info.status == "FAILED"


def test_flatten_makes_dotted_string_params():
    assert tracking.flatten({"a": {"b": 1, "c": "x"}, "d": [1, 2]}) == {"a.b": "1", "a.c": "x", "d": "[1, 2]"}


def test_reports_saved_while_mlflow_was_down_can_be_logged_later(tmp_path, monkeypatch, capsys):
    from workbench import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("project: {experiment: later}\n")
    path = write_report(small_report())
    assert cli.main(["track", str(path), "--variant-prefix", "gpu-"]) == 0
    assert "logged prepare:gpu-base (ok)" in capsys.readouterr().out
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("later").experiment_id],
                               "tags.`workbench.role` = 'stage'")
    assert run.info.run_name == "prepare:gpu-base" and run.data.metrics["parameters"] == 3.0
