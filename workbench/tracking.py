"""MLflow tracking. The only module that imports mlflow; stages hand it finished reports.

Default store: ``mlflow.db`` (SQLite) and ``mlartifacts/`` in the project root, which
``workbench ui`` / ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` read. Set
``MLFLOW_TRACKING_URI`` to use a team server instead (``workbench ui --team``, docs/team.md).

Runs: one parent run per model variant (``variant:<name>``), and under it one run per stage
execution (``<stage>:<variant>``) with the stage's config as params, its metrics, the report and
the executed notebook as artifacts, and system metrics sampled while it ran. Any MLflow failure
is a logged warning: the report on disk is the result, tracking is a copy.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from workbench import variants
from workbench.reports import Report

log = logging.getLogger(__name__)
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / DB_FILE}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"name": "x"}} -> {"model.name": "x"}; MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:6000]  # MLflow's param value limit
    return out


def _experiment(mlflow, name: str, root: Path) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = (root / ARTIFACT_DIR).resolve().as_uri()
    # "custom_model_development" makes MLflow 3's UI open the experiment on its runs table,
    # not on the GenAI traces overview.
    return mlflow.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def _variant_parent(client, experiment_id: str, variant: str) -> str:
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`workbench.role` = 'variant' and tags.`workbench.variant` = '{variant}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=f"variant:{variant}",
        tags={"workbench.role": "variant", "workbench.variant": variant},
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


class StageRun:
    """Handle on an open MLflow run; every method degrades to a warning if MLflow fails."""

    def __init__(self, mlflow=None, run_id: str | None = None):
        self._mlflow = mlflow
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _try(self, what: str, fn, *args, **kwargs):
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # tracking must never cost a result
            log.warning("MLflow: could not %s (%s: %s); results are on disk", what, type(err).__name__, err)
            return None

    def log_report(self, report: Report, artifacts: list[Path] = ()) -> None:
        if not self.active:
            return
        mlflow = self._mlflow
        self._try("log params", mlflow.log_params, flatten(report.config, f"{report.stage}."))
        self._try("log metrics", mlflow.log_metrics, report.metrics)
        self._try("set tags", mlflow.set_tags, {
            "workbench.git_sha": report.provenance.git_sha or "unknown",
            "workbench.schema_version": str(report.schema_version),
        })
        self._try("log report", mlflow.log_dict, report.model_dump(mode="json"), "report.json")
        for path in artifacts:
            if Path(path).exists():
                self._try(f"log artifact {path}", mlflow.log_artifact, str(path))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._try(f"log artifact {path}", self._mlflow.log_artifact, str(path), artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            self._try("log metrics", self._mlflow.log_metrics, metrics, step=step)


@contextmanager
def stage_run(
    stage: str, variant: str, experiment: str = "llm-workbench", system_metrics: bool = True,
    root: Path | None = None,
) -> Iterator[StageRun]:
    """Open ``<stage>:<variant>`` under the variant's parent run for the duration of the block."""
    root = (root or Path.cwd()).resolve()
    # Fail fast against a dead remote server instead of MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    handle = StageRun()
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(root))
        exp_id = _experiment(mlflow, experiment, root)
        tags = {"workbench.stage": stage, "workbench.variant": variant, "workbench.role": "stage"}
        if variant != variants.ALL:  # a cross-variant run (the report) is top-level
            tags["mlflow.parentRunId"] = _variant_parent(mlflow.MlflowClient(), exp_id, variant)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(2)
        run = mlflow.start_run(
            experiment_id=exp_id, run_name=f"{stage}:{variant}", log_system_metrics=system_metrics,
            tags=tags,
        )
        handle = StageRun(mlflow, run.info.run_id)
    except Exception as err:
        log.warning("MLflow unavailable at %s (%s: %s); continuing without tracking",
                    tracking_uri(root), type(err).__name__, err)
    status = "FINISHED"
    try:
        yield handle
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if handle.active:
            handle._try("end run", handle._mlflow.end_run, status)


def log_child_run(parent: StageRun, name: str, params: dict[str, Any],
                  metrics: dict[str, float]) -> str | None:
    """A finished run nested under ``parent`` (e.g. one load-test step under ``loadtest:<variant>``).

    Returns its run id, or None when the parent is not tracking or MLflow fails (a warning)."""
    if not parent.active:
        return None

    def create() -> str:
        import time

        now_ms = int(time.time() * 1000)
        client = parent._mlflow.MlflowClient()
        exp_id = client.get_run(parent.run_id).info.experiment_id
        run = client.create_run(exp_id, run_name=name, tags={
            "mlflow.parentRunId": parent.run_id, "workbench.role": "child"})
        client.log_batch(
            run.info.run_id,
            metrics=[parent._mlflow.entities.Metric(k, float(v), now_ms, 0) for k, v in metrics.items()],
            params=[parent._mlflow.entities.Param(k, v) for k, v in flatten(params).items()])
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    return parent._try(f"log child run {name}", create)


def log_variant_summary(variant: str, metrics: dict[str, float], experiment: str = "llm-workbench",
                        root: Path | None = None) -> bool:
    """Put a variant's headline numbers on its parent run (``variant:<name>``), so the MLflow UI's
    compare view lines variants up on shared keys (accuracy, TTFT, size). False on any failure."""
    root = (root or Path.cwd()).resolve()
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
        mlflow.set_tracking_uri(tracking_uri(root))
        parent = _variant_parent(client, _experiment(mlflow, experiment, root), variant)
        now_ms = int(__import__("time").time() * 1000)
        client.log_batch(parent, metrics=[
            mlflow.entities.Metric(k, float(v), now_ms, 0) for k, v in metrics.items()])
        return True
    except Exception as err:
        log.warning("MLflow: could not log the summary of %s (%s: %s)", variant, type(err).__name__, err)
        return False
