"""The speed stage: model shapes served with random weights, in each precision, measured by the
load test's executor, every figure set against the GPU's limit (issue 32).

    python -m pipelines.run_stage speed                       # as DVC runs it
    dvc exp run $(python -m pipelines.gpu.overlay pipelines/gpu/params-gpu3.yaml --set-args)   # Llama-3.1-8B on a GPU

Two runs, each one call of ``loadtest.run`` (the one executor), reports under reports/speed/:

1. **concurrency** (``speed.concurrencies``): every shape x precision arm up together, closed-loop
   steps at each concurrency in counterbalanced blocks, on the same requests. Per arm and step:
   TPOT and output tokens/s with their intervals, ratios to bf16 paired by block (all.json), and
   the decode roofline at the batch vLLM ran (``server_running_mean``) and the mean context.
2. **knee** (``speed.knee``): the first arm (or ``speed.knee_arms``, each) searched for its highest
   rate within the SLO, direct and through the gateway: rate against TTFT, mean latency and GPU
   utilization from steady-state probes, and the gateway's share of the direct knee.

Arms are shape x precision x layout (``speed.layouts``: TP, PP, EP; workbench/layouts.py checks
each against its shape; workbench/speed_arms.py names them and builds their folders). With
``speed.shard_arm``, that arm's random weights are then saved as vLLM sharded_state and reloaded,
timed (workbench/speed_shard.py).

``reports/speed/summary.json`` (this stage's report) holds the tables; ``runs/speed/tables.md``
shows them (workbench/speed_tables.py builds both). Rows are speed-only: the weights are random, so
no quality column comes from them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from workbench import roofline, stats
from workbench.config import LoadtestConfig, SpeedConfig, deep_merge
from workbench.loadtest.details import ComparedDetails
from workbench.reports import Details, Report, gpus, write_report
from workbench.speed_arms import arm_specs, arms, knee_arms, run_config
from workbench.speed_tables import knee_markdown, roofline_rows, shard_markdown, tables_markdown

log = logging.getLogger(__name__)
STAGE = "speed"
VARIANT = "summary"


class RooflineRow(BaseModel):
    """One arm's step: TPOT and TTFT p50 and output tokens/s with their intervals (``value``,
    ``lo``, ``hi`` only, pooled over repeats) beside their floors at the batch vLLM ran. The
    floors are absent without a GPU known to workbench/roofline.py."""

    model_config = ConfigDict(extra="forbid")

    arm: str
    shape: str
    precision: str
    layout: str = "tp1"  # its speed.layouts entry (absent before layouts: one GPU)
    gpus: int = 1  # TP x PP: the floors divide by them
    step: str
    batch_mean: float  # vLLM's mean running requests over the step (server_running_mean)
    prompt_tokens: float  # means over the step's answered requests, as vLLM counted them
    output_tokens: float
    tpot_ms_p50: stats.Estimate
    ttft_ms_p50: stats.Estimate
    output_tokens_per_s: stats.Estimate
    gpu_util_pct_mean: float | None = None
    limited_by: str | None = None
    weight_bytes_per_step: float
    # what vLLM's log says it loaded (absent before 2026-12-06: results/gpu-3)
    loaded_gib: float | None = None
    expected_gib: float | None = None
    kernels: list[str] = []
    precision_as_asked: bool = True
    # the layout vLLM's log says it started with, and whether it is the asked one (None: not logged)
    layout_seen: dict[str, Any] = {}
    layout_as_asked: bool | None = None
    tpot_floor_ms: float | None = None
    tpot_roofline_fraction: float | None = None
    prefill_floor_ms: float | None = None
    ttft_roofline_fraction: float | None = None


class ConcurrencyRun(BaseModel):
    """The concurrency run: its compared report and what it says of the arms against each other."""

    model_config = ConfigDict(extra="forbid")

    report: str  # its all.json
    comparisons: dict[str, Any] | None = None  # that report's ``paired`` (ratios to the control)
    drift: dict[str, Any] | None = None


class KneeRun(BaseModel):
    """The knee run: its compared report, the gateway's share of the direct knee, its metrics."""

    model_config = ConfigDict(extra="forbid")

    report: str
    gateway: dict[str, Any] = {}
    metrics: dict[str, float] = {}


class SpeedDetails(Details):
    """``details`` of reports/speed/summary.json. JSON Schema: docs/schemas/speed.json."""

    arms: list[str]
    device: str | None = None  # the GPU's name (speed.gpu, else the provenance's first GPU)
    gpu: str | None = None  # its entry in workbench/roofline.py, None when unknown
    gpu_source: str | None = None
    speed_only: bool = True  # random weights: no quality figure comes from these arms
    layouts: dict[str, dict[str, Any]] = {}  # arm -> its layout's serving keys (TP, PP, EP, devices)
    concurrency: ConcurrencyRun | None = None
    knee: KneeRun | None = None
    roofline: list[RooflineRow] = []
    shard: dict[str, Any] | None = None  # speed.shard_arm's sharded save and reload, timed (speed_shard.py)


class SpeedReport(Report):
    """reports/speed/summary.json, typed."""

    details: SpeedDetails


def device_name() -> str | None:
    """The first GPU's name as the report's provenance records it, or None on a host without one."""
    found = gpus()
    return found[0].split(",")[0].strip() if found else None


def run(cfg: SpeedConfig) -> Report:
    from workbench import loadtest

    arm_keys = arms(cfg)
    searched = knee_arms(cfg, list(arm_keys)) if cfg.knee is not None else []  # a misnamed arm fails now
    if cfg.shard_arm is not None and cfg.shard_arm not in arm_keys:
        raise ValueError(f"speed.shard_arm {cfg.shard_arm!r} is not an arm; the arms are {list(arm_keys)}")
    name = cfg.gpu or device_name()
    gpu = roofline.gpu(name) if name else None
    details: dict = {"arms": list(arm_keys), "device": name, "gpu": gpu.name if gpu else None,
                     "layouts": {arm: cfg.layouts[lname].model_dump() for arm, (_, _, lname) in arm_specs(cfg).items()},
                     "gpu_source": gpu.source if gpu else None, "speed_only": True}
    outputs: dict[str, str] = {}
    rows: list[dict] = []
    if cfg.concurrencies:
        conc = loadtest.run(run_config(cfg, arm_keys, "concurrency", mode="concurrency",
                                       concurrencies=cfg.concurrencies), stage=f"{STAGE}/concurrency")
        compared = ComparedDetails.of(conc)
        details["concurrency"] = {"report": str(conc.path), "comparisons": compared.paired,
                                  "drift": compared.drift}
        rows = roofline_rows(cfg, conc, gpu)
    knee = None
    if cfg.knee is not None:
        knee_cfg = LoadtestConfig.model_validate(deep_merge(
            run_config(cfg, {a: arm_keys[a] for a in searched}, "knee", mode="knee",
                       gateway_arms=searched[:1]).model_dump(),
            cfg.knee))
        kr = loadtest.run(knee_cfg, stage=f"{STAGE}/knee")
        knee = {"report": str(kr.path), "gateway": ComparedDetails.of(kr).gateway, "metrics": kr.metrics}
        details["knee"] = knee
    if cfg.shard_arm is not None:
        from workbench import speed_shard

        details["shard"] = speed_shard.save_and_reload(cfg, cfg.shard_arm, arm_keys[cfg.shard_arm])
    details["roofline"] = rows
    tables = Path(cfg.out_dir) / "tables.md"
    tables.parent.mkdir(parents=True, exist_ok=True)
    tables.write_text(tables_markdown(rows, gpu, {"report": knee["report"]} if knee else None)
                      + (knee_markdown(cfg, kr, gpu) if knee else "") + shard_markdown(details.get("shard")))
    outputs["tables"] = str(tables)
    metrics = {f"{r['arm']}.{r['step']}.tpot_roofline_fraction": r["tpot_roofline_fraction"]
               for r in rows if r.get("tpot_roofline_fraction") is not None}
    for key in ("save_s", "reload_startup_s"):
        if (details.get("shard") or {}).get(key) is not None:
            metrics[f"shard.{key}"] = details["shard"][key]
    report = Report(stage=STAGE, variant=VARIANT, config=cfg.model_dump(mode="json"), metrics=metrics,
                    details=SpeedDetails.checked(details), outputs=outputs)
    write_report(report)
    log.info("speed: %d arms, %d roofline rows -> %s", len(arm_keys), len(rows), report.path)
    return report
