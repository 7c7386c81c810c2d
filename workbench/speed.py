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
each against its shape). With ``speed.shard_arm``, that arm's random weights are then saved as vLLM
sharded_state and reloaded, timed (workbench/speed_shard.py).

``reports/speed/summary.json`` (this stage's report) holds the tables; ``runs/speed/tables.md``
shows them. Rows are speed-only: the weights are random, so no quality column comes from them.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from workbench import layouts, roofline, shapes, stats
from workbench.config import LoadtestConfig, SpeedConfig, deep_merge
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.reports import Details, Report, gpus, read_report, write_report

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


def arm_specs(cfg: SpeedConfig) -> dict[str, tuple[str, str, str]]:
    """{arm name: (shape, precision, layout)}: shape x precision x the shape's layouts. One layout
    in speed.layouts: ``<shape>-<precision>`` (the names before layouts); several: ``...-<layout>``."""
    suffix = len(cfg.layouts) > 1
    return {f"{name}-{precision}" + (f"-{lname}" if suffix else ""): (name, precision, lname)
            for name, shape in cfg.shapes.items() for precision in cfg.precisions
            for lname in (shape.layouts or cfg.layouts)}


def arms(cfg: SpeedConfig) -> dict[str, dict]:
    """{arm name: serve.chat keys}: each shape's model folder per precision, built here (one per
    shape and precision, shared by its layouts), served in the arm's layout."""
    from workbench.serve import detect_device

    server = (cfg.resolved or LoadtestConfig()).server
    device = detect_device() if server.device == "auto" else server.device
    layouts.check_speed(cfg)  # every layout against its shape before any folder is built
    for lname, layout in cfg.layouts.items():
        layouts.refuse_on_cpu(lname, layout, device)
    out, built = {}, {}
    for arm, (name, precision, lname) in arm_specs(cfg).items():
        shape, layout = cfg.shapes[name], cfg.layouts[lname]
        if (name, precision) not in built:
            built[name, precision] = shapes.build(shape.config, precision, Path(cfg.out_dir) / "models" / f"{name}-{precision}",
                                                  shape.tokenizer, Path(cfg.out_dir) / "cache")
        folder = built[name, precision]
        out[arm] = {**shapes.server_overrides(folder, precision), "served_name": arm,
                    **layouts.server_keys(layout, device, server.env)}
    return out


def run_config(cfg: SpeedConfig, arm_keys: dict[str, dict], part: str, **update) -> LoadtestConfig:
    base = cfg.resolved or LoadtestConfig()
    return base.model_copy(update={
        "variants": list(arm_keys), "variant": None, "model_dir": None, "model": None, "base_url": None,
        "server_overrides": {**base.server_overrides, **arm_keys}, "out_dir": f"{cfg.out_dir}/{part}",
        "gateway_arms": [], "via_gateway": False, **update})


def device_name() -> str | None:
    """The first GPU's name as the report's provenance records it, or None on a host without one."""
    found = gpus()
    return found[0].split(",")[0].strip() if found else None


LOADED_RE = re.compile(r"Model loading took ([0-9.]+) GiB")
KERNEL_RE = re.compile(r"Using (\w+Kernel) for (\w+)")


def server_facts(log_path: str | None) -> dict:
    """What vLLM's log says it loaded and which linear kernel it chose: the check that an arm ran
    in the precision it was asked for (a config vLLM does not honour loads 16-bit weights)."""
    text = Path(log_path).read_text(errors="replace") if log_path and Path(log_path).exists() else ""
    loaded = LOADED_RE.findall(text)
    return {"loaded_gib": float(loaded[-1]) if loaded else None,
            "kernels": sorted({f"{k} ({m})" for k, m in KERNEL_RE.findall(text)})}


PARALLEL_RE = re.compile(r"\b(tensor|pipeline)_parallel_size=(\d+)")  # vLLM's "Initializing a V1 LLM engine" line
EP_RE = re.compile(r"'enable_expert_parallel': True")  # its "non-default args" line


def server_layout(log_path: str | None) -> dict:
    """The layout vLLM's log says the engine started with: {tensor_parallel_size, pipeline_parallel_size,
    enable_expert_parallel}, None where the log says nothing (no log, or a server that never started)."""
    text = Path(log_path).read_text(errors="replace") if log_path and Path(log_path).exists() else ""
    sizes = {f"{kind}_parallel_size": int(n) for kind, n in PARALLEL_RE.findall(text)}
    return {"tensor_parallel_size": sizes.get("tensor_parallel_size"),
            "pipeline_parallel_size": sizes.get("pipeline_parallel_size"),
            "enable_expert_parallel": bool(EP_RE.search(text)) if sizes else None}


def layout_as_asked(seen: dict, asked: dict) -> bool | None:
    """Whether the logged layout is the asked one; None where the log does not say."""
    if seen["tensor_parallel_size"] is None:
        return None
    return all(seen[k] == asked[k] for k in seen)


def mean_tokens(records) -> tuple[float, float]:
    """Mean prompt and completion tokens of a step's measured, answered requests (as vLLM counted)."""
    ok = [r for r in records if r.success and not r.warmup]
    if not ok:
        return 0.0, 0.0
    return (sum(r.prompt_tokens or 0 for r in ok) / len(ok), sum(r.completion_tokens or 0 for r in ok) / len(ok))


def roofline_rows(cfg: SpeedConfig, report: Report, gpu: roofline.GPU | None) -> list[dict]:
    """Per arm and step: TPOT and TTFT p50 with their intervals (pooled over repeats, from the
    arm's report) beside their floors at the batch vLLM ran (None without a known GPU)."""
    from workbench.loadtest.report import read_records

    rows = []
    specs = arm_specs(cfg)
    for path in ComparedDetails.of(report).reports.values():
        if not Path(path).exists():
            continue
        arm_report = read_report(path)
        arm, arm_details = arm_report.variant, ArmDetails.of(arm_report)
        if arm not in specs:
            continue
        shape_name, precision, lname = specs[arm]
        split = roofline.Split(cfg.layouts[lname].tensor_parallel_size, cfg.layouts[lname].pipeline_parallel_size)
        shape = roofline.Shape.from_config(shapes.read_shape(cfg.shapes[shape_name].config))
        flat = arm_report.metrics
        facts = server_facts(arm_details.server.get("log"))
        seen = server_layout(arm_details.server.get("log"))
        expected = roofline.weight_bytes_held(shape, precision) / split.gpus / 2**30  # vLLM logs one rank's
        # more than 1.5 x the weights the precision should hold: vLLM did not quantize as asked
        as_asked = facts["loaded_gib"] is None or facts["loaded_gib"] <= 1.5 * expected + 1.0
        limits = {st.label: st.limited_by for st in arm_details.steps}
        for label, m in arm_details.step_metrics.items():
            if f"{label}.requests" not in flat:  # a repeat ("-r1"): pooled into its point's figures
                continue
            def est(key: str) -> dict:
                return {"value": flat.get(f"{label}.{key}"), "lo": flat.get(f"{label}.{key}_ci_lo"),
                        "hi": flat.get(f"{label}.{key}_ci_hi")}
            records = arm_report.outputs.get(f"records_{label}")
            prompt, out_tokens = mean_tokens(read_records(records)) if records and Path(records).exists() else (0, 0)
            batch = m.get("server_running_mean") or 1.0
            tpot, ttft = est("tpot_ms_p50"), est("ttft_ms_p50")
            row = {"arm": arm, "shape": shape_name, "precision": precision, "layout": lname, "gpus": split.gpus,
                   "step": label, "batch_mean": batch,
                   "prompt_tokens": prompt, "output_tokens": out_tokens, "tpot_ms_p50": tpot, "ttft_ms_p50": ttft,
                   "output_tokens_per_s": est("output_tokens_per_s"),
                   "gpu_util_pct_mean": m.get("gpu_util_pct_mean"), "limited_by": limits.get(label),
                   "weight_bytes_per_step": roofline.weight_bytes_per_step(shape, precision, batch),
                   "loaded_gib": facts["loaded_gib"], "expected_gib": expected, "kernels": facts["kernels"],
                   "precision_as_asked": as_asked, "layout_seen": seen,
                   "layout_as_asked": layout_as_asked(seen, cfg.layouts[lname].model_dump())}
            if gpu is not None:
                floor = roofline.decode_floor_ms(shape, precision, gpu, batch, prompt + out_tokens / 2, split)
                pre = roofline.prefill_floor_ms(shape, precision, gpu, prompt, split)
                row.update(tpot_floor_ms=floor, tpot_roofline_fraction=roofline.fraction(floor, tpot["value"]),
                           prefill_floor_ms=pre, ttft_roofline_fraction=roofline.fraction(pre, ttft["value"]))
            rows.append(row)
    return rows


def _fmt(v, spec=".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _ci(e: dict, spec=".1f") -> str:
    """value [lo, hi]"""
    return f"{_fmt(e.get('value'), spec)} [{_fmt(e.get('lo'), spec)}, {_fmt(e.get('hi'), spec)}]"


def tables_markdown(rows: list[dict], gpu: roofline.GPU | None, knee: dict | None) -> str:
    lines = ["# Speed-only arms (random weights: no quality figures)", ""]
    lines.append(f"GPU: {gpu.name} ({gpu.source})" if gpu else "GPU: none known to workbench/roofline.py "
                 "(no roofline: a CPU run, or a GPU outside its table)")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        r = next(x for x in rows if x["arm"] == arm)
        lines.append(f"- {arm}: layout {r.get('layout')} on {r.get('gpus', 1)} GPU(s); "
                     f"vLLM loaded {_fmt(r['loaded_gib'])} GiB a GPU (the precision holds {r['expected_gib']:.1f}); "
                     f"linear kernel {', '.join(r['kernels']) or 'cuBLAS / not logged'}"
                     + ("" if r["precision_as_asked"] else " -- NOT QUANTIZED AS ASKED: its rows are not this precision")
                     + (" -- NOT IN ITS LAYOUT: vLLM logged " + str(r["layout_seen"])
                        if r.get("layout_as_asked") is False else ""))
    lines += ["", "| arm | step | batch (mean) | TPOT p50 ms | floor ms | of roofline | out tok/s | TTFT p50 ms "
              "| prefill floor ms | GPU % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['step']} | {_fmt(r['batch_mean'])} | {_ci(r['tpot_ms_p50'], '.2f')} "
                     f"| {_fmt(r.get('tpot_floor_ms'), '.2f')} | {_fmt(r.get('tpot_roofline_fraction'), '.2f')} "
                     f"| {_ci(r['output_tokens_per_s'], '.0f')} | {_ci(r['ttft_ms_p50'])} "
                     f"| {_fmt(r.get('prefill_floor_ms'), '.2f')} | {_fmt(r['gpu_util_pct_mean'], '.0f')} |")
    if knee:
        lines += ["", f"Knee run: {knee}"]
    return "\n".join(lines) + "\n"


def knee_arms(cfg: SpeedConfig, names: list[str]) -> list[str]:
    """The arms the knee search runs on: ``speed.knee_arms`` (each named arm must exist), else the first."""
    if cfg.knee_arms is None:
        return names[:1]
    unknown = [a for a in cfg.knee_arms if a not in names]
    if unknown or not cfg.knee_arms:
        raise ValueError(f"speed.knee_arms {cfg.knee_arms}: {unknown or 'empty'}; the arms are {names}")
    return list(cfg.knee_arms)


def shard_markdown(shard: dict | None) -> str:
    if not shard:
        return ""
    ranks = ", ".join(f"{b / 2**30:.2f}" for b in shard["bytes_per_rank"].values())
    reload = (f"reloaded (sharded_state) and answered, server up in {_fmt(shard['reload_startup_s'])} s"
              if shard["reload_success"] else f"reload FAILED: {(shard['reload_error'] or '')[-300:]}")
    return (f"\nSharded checkpoint of {shard['arm']} (TP={shard['tensor_parallel_size']}): saved in "
            f"{_fmt(shard['save_s'])} s (engine start with random weights + write; GiB per rank: {ranks}); {reload}.\n")


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
                      + shard_markdown(details.get("shard")))
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
