"""The speed stage's rows and tables: each arm's steps beside their roofline floors, read back from
the arms' load-test reports, with what vLLM's log says it ran (the precision's weights, the linear
kernel, the parallel layout), as markdown (runs/speed/tables.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from workbench import roofline, shapes, stats
from workbench.config import SpeedConfig
from workbench.loadtest.arms import GATEWAY_SUFFIX
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.reports import Report, read_report
from workbench.speed_arms import arm_specs


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


def arm_shape(cfg: SpeedConfig, spec: tuple[str, str, str]) -> tuple[roofline.Shape, roofline.Split]:
    """An arm's (shape, precision, layout) spec as the roofline's shape and its split over GPUs."""
    shape_name, _, lname = spec
    layout = cfg.layouts[lname]
    return (roofline.Shape.from_config(shapes.read_shape(cfg.shapes[shape_name].config)),
            roofline.Split(layout.tensor_parallel_size, layout.pipeline_parallel_size))


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
        shape, split = arm_shape(cfg, specs[arm])
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


def knee_markdown(cfg: SpeedConfig, report: Report, gpu: roofline.GPU | None) -> str:
    """Table 6.2 from the knee run: every probe of every arm (repeats apart, as each was judged
    steady or not), its TTFT, mean latency, TPOT beside the decode floor at the batch vLLM ran, GPU
    busy share, steady-state verdict and SLO verdict; then each arm's knee and the gateway's share."""
    from workbench.loadtest.report import read_records

    compared = ComparedDetails.of(report)
    specs = arm_specs(cfg)
    lines = ["", "## Table 6.2: the knee search, probe by probe, each with its steady-state verdict", "",
             "| arm | offered req/s | achieved req/s | TTFT p50 ms | TTFT p99 ms | mean E2E ms | TPOT p50 ms "
             "| decode floor ms (of roofline) | running (mean) | GPU % | steady state | SLO | limited by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    knees = []
    for arm, path in compared.reports.items():
        if not Path(path).exists():
            continue
        details = ArmDetails.of(read_report(path))
        spec = specs.get(arm.removesuffix(GATEWAY_SUFFIX))  # a gateway arm: its direct arm's shape
        shape, split = arm_shape(cfg, spec) if spec else (None, None)
        for st in sorted(details.steps, key=lambda x: (x.offered_req_per_s, x.repeat)):
            m = details.step_metrics.get(st.label, {})
            batch = m.get("server_running_mean") or 1.0
            tpot, ttft = st.latency["tpot"].p.get("p50"), st.latency["ttft"].p
            floor = None
            if gpu is not None and shape is not None and st.records_file and Path(st.records_file).exists():
                prompt, out = mean_tokens(read_records(st.records_file))
                floor = roofline.decode_floor_ms(shape, spec[1], gpu, batch, prompt + out / 2, split)
            of = roofline.fraction(floor, tpot.value if tpot else None) if floor else None
            p99 = ttft.get("p99")
            lines.append(
                f"| {arm} | {st.offered_req_per_s:.4g} | {_fmt(st.achieved_req_per_s)} "
                f"| {_ci(ttft['p50'].model_dump()) if ttft.get('p50') else 'n/a'} "
                f"| {_fmt(p99.value) if p99 else 'n/a'}{'' if not p99 or p99.hi is not None else ' (no upper bound)'} "
                f"| {_fmt(st.latency['e2el'].mean_ms, '.0f')} | {_ci(tpot.model_dump(), '.2f') if tpot else 'n/a'} "
                f"| {_fmt(floor, '.2f')} ({_fmt(of, '.2f')}) | {_fmt(batch)} | {_fmt(st.utilization_pct, '.0f')} "
                f"| {(st.steady_state or {}).get('verdict', 'not judged')} | {st.slo.overall.value} "
                f"| {st.limited_by.split(';')[0] or 'n/a'} |")  # its first finding (limits.limiting_factor)
        if details.knee is not None:
            k = details.knee
            probes = ", ".join(f"{p.rate:.4g} {getattr(p.verdict, 'value', p.verdict)}" for p in k.probes)
            knees.append(f"- {arm}: sustained {_fmt(k.lo)} req/s, failed at {_fmt(k.hi)} "
                         f"(knee in [{_fmt(k.lo)}, {_fmt(k.hi)}); probes {probes})")
    for name, g in (compared.gateway or {}).items():
        r = g.get("sustained_ratio")
        if r:
            knees.append(f"- {name}: the gateway's knee over the direct knee {_fmt(r['value'], '.2f')} "
                         f"[{_fmt(r['lo'], '.2f')}, {_fmt(r['hi'], '.2f')}] ({r['note']})")
    return "\n".join(lines + ["", "Knees:"] + knees + gateway_probe_lines(compared)) + "\n"


def gateway_probe_lines(compared: ComparedDetails) -> list[str]:
    """Each probe both a gateway arm and its direct arm ran (the same step label: the same block,
    requests and server, back to back): gateway / direct for TTFT p50, TPOT p50 and mean E2E, each
    bounded by the two steps' own block-bootstrap intervals (``stats.ratio_bounds``). One block a
    probe has no between-block spread to pair over (``all.json``'s ``per_rate`` needs two), so
    these bounds hold the noise within the steps only, not between runs."""
    lines = []
    for name, g in (compared.gateway or {}).items():
        paths = [compared.reports.get(g.get("direct_arm")), compared.reports.get(name)]
        if not all(p and Path(p).exists() for p in paths):
            continue
        direct, via = (ArmDetails.of(read_report(p)) for p in paths)
        by_label = {st.label: st for st in direct.steps}
        if not lines:
            lines = ["", "## The gateway against the direct arm, probe by probe", "",
                     "Gateway / direct on the same block; bounds from the two steps' 95 % intervals "
                     "(both hold with probability >= 90 %; within-step noise only).", "",
                     "| arm | offered req/s | TTFT p50 | TPOT p50 | mean E2E | steady (direct, gateway) |",
                     "|---|---|---|---|---|---|"]
        for st in sorted(via.steps, key=lambda x: (x.offered_req_per_s, x.repeat)):
            d = by_label.get(st.label)
            if d is None:
                continue
            cells = []
            for metric, pick in (("ttft", "p50"), ("tpot", "p50"), ("e2el", "mean")):
                a, b = (x.latency[metric].mean if pick == "mean" else x.latency[metric].p.get(pick)
                        for x in (st, d))
                cells.append(_ci(stats.ratio_bounds(a, b).model_dump(), ".2f") if a and b else "n/a")
            verdicts = ", ".join((x.steady_state or {}).get("verdict", "not judged") for x in (d, st))
            lines.append(f"| {name} | {st.offered_req_per_s:.4g}{' (repeat)' if st.repeat else ''} "
                         f"| {' | '.join(cells)} | {verdicts} |")
    return lines


def shard_markdown(shard: dict | None) -> str:
    if not shard:
        return ""
    ranks = ", ".join(f"{b / 2**30:.2f}" for b in shard["bytes_per_rank"].values())
    reload = (f"reloaded (sharded_state) and answered, server up in {_fmt(shard['reload_startup_s'])} s"
              if shard["reload_success"] else f"reload FAILED: {(shard['reload_error'] or '')[-300:]}")
    return (f"\nSharded checkpoint of {shard['arm']} (TP={shard['tensor_parallel_size']}): saved in "
            f"{_fmt(shard['save_s'])} s (engine start with random weights + write; GiB per rank: {ranks}); {reload}.\n")
