"""Stage ``report``: every variant's reports side by side, the seed's two tables, and a decision.

    python -m pipelines.run_stage report         # as DVC runs it (also exports the notebook to HTML)
    workbench report                             # the same run(cfg), without the notebook

Reads only other stages' reports (reports/<stage>/<variant>.json) and the load test's raw records.
Writes reports/report/all.json (the result), metrics.json (for ``dvc metrics show``), plot data
under reports/report/plots/ (for ``dvc plots show``) and PNG plots. Recommendation: the variant
with the best accuracy that meets the SLOs at the target rate within the memory budget.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from workbench.config import ReportConfig
from workbench.reports import Report, read_report, report_path, write_json_atomic, write_report

log = logging.getLogger(__name__)
VARIANT = "all"  # == tracking.ALL_VARIANTS: its MLflow run is top-level, not under a variant
OUT_DIR = Path("reports/report")
METRICS_FILE = Path("metrics.json")


def _load(stage: str, variant: str) -> Report | None:
    path = report_path(stage, variant)
    if not path.exists():
        return None
    try:
        return read_report(path)
    except ValueError as err:
        log.warning("skipping %s: %s", path, err)
        return None


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def quant_row(variant: str, base_bytes: float, base_ppl: float, cfg: ReportConfig) -> dict:
    """One row of the seed's table 4.2: size, compression, speed, perplexity change, accuracy."""
    q = _load("quantize", variant)
    e = _load("evaluate", variant)
    lt = _load("loadtest", variant)
    size = base_bytes if variant == "base" else _nan(q and q.metrics.get("model_bytes"))
    ppl = _nan(e and e.metrics.get("ppl_word"))
    row = {
        "variant": variant,
        "method": "bf16 (reference)" if variant == "base" else (q.details.get("method") if q else "?"),
        "bytes": size,
        "compression": base_bytes / size if size and not math.isnan(size) else math.nan,
        "output_tokens_per_s": _nan(lt and lt.metrics.get("max_output_tokens_per_s")),
        "ppl_word": ppl,
        "ppl_change_pct": 100 * (ppl / base_ppl - 1) if base_ppl and not math.isnan(base_ppl) else math.nan,
        "mmlu_acc": _nan(e and e.metrics.get("mmlu_acc")),
        "ceval_acc": _nan(e and e.metrics.get("ceval_acc")),
    }
    row["broken"] = bool(ppl > cfg.broken_ppl_ratio * base_ppl) if not math.isnan(ppl * base_ppl) else False
    return row


def load_rows(variant: str) -> list[dict]:
    lt = _load("loadtest", variant)
    return [{"variant": variant, **r} for r in (lt.details.get("table", []) if lt else [])]


def at_rate(rows: list[dict], rate: float) -> dict | None:
    """The step offered at ``rate`` (the nearest one at or above it, else the highest)."""
    if not rows:
        return None
    above = [r for r in rows if r["offered req/s"] >= rate - 1e-9]
    return min(above, key=lambda r: r["offered req/s"]) if above else max(rows, key=lambda r: r["offered req/s"])


def recommend(quant: list[dict], load: dict[str, list[dict]], cfg: ReportConfig) -> dict:
    """Best accuracy among variants that are not broken, fit the budget and meet the SLOs."""
    why_not: dict[str, str] = {}
    ok = []
    for row in quant:
        v = row["variant"]
        step = at_rate(load.get(v, []), cfg.target_rate_req_per_s)
        acc = row.get(cfg.accuracy_metric, math.nan)
        if row["broken"]:
            why_not[v] = f"broken: perplexity {row['ppl_word']:.2f} > {cfg.broken_ppl_ratio}x base"
        elif cfg.memory_budget_bytes and row["bytes"] > cfg.memory_budget_bytes:
            why_not[v] = f"{row['bytes'] / 1e6:.0f} MB exceeds the {cfg.memory_budget_bytes / 1e6:.0f} MB budget"
        elif step is None:
            why_not[v] = "no load test"
        elif step["goodput"] < cfg.min_goodput:
            why_not[v] = (f"goodput {step['goodput']:.0%} < {cfg.min_goodput:.0%} at "
                          f"{step['offered req/s']:g} req/s (TTFT p99 {step['TTFT p99 ms']:.0f} ms)")
        elif math.isnan(acc):
            why_not[v] = f"no {cfg.accuracy_metric}"
        else:
            ok.append((acc, -row["bytes"], v, step))
    if not ok:
        return {"variant": None, "reason": "no variant qualifies: " + "; ".join(f"{v}: {w}" for v, w in why_not.items()),
                "rejected": why_not}
    acc, neg_bytes, v, step = max(ok)
    return {"variant": v, "rejected": why_not, "reason": (
        f"{v} has the best {cfg.accuracy_metric} ({acc:.3f}) of the variants that meet the SLOs at "
        f"{step['offered req/s']:g} req/s (goodput {step['goodput']:.0%}, TTFT p99 {step['TTFT p99 ms']:.0f} ms)"
        f" within the memory budget, at {-neg_bytes / 1e6:.0f} MB on disk")}


def ttft_samples_ms(variant: str, rate: float) -> list[float]:
    lt = _load("loadtest", variant)
    if not lt:
        return []
    step = at_rate(load_rows(variant), rate)
    path = step and lt.outputs.get(f"records_rate_{step['offered req/s']:g}")
    if not path or not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("success") and not rec.get("warmup") and rec.get("first_token_s") is not None:
            out.append(1000 * (rec["first_token_s"] - rec["send_s"]))
    return out


def plot(quant: list[dict], load: dict[str, list[dict]], cfg: ReportConfig, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in quant:
        ax.scatter(row["bytes"] / 1e6, row[cfg.accuracy_metric], s=40)
        ax.annotate(row["variant"], (row["bytes"] / 1e6, row[cfg.accuracy_metric]), fontsize=8)
    ax.set(xlabel="size on disk (MB)", ylabel=cfg.accuracy_metric, title="Accuracy vs size")
    fig.tight_layout(); fig.savefig(out / "accuracy_vs_size.png", dpi=110); plt.close(fig)
    paths["accuracy_vs_size"] = str(out / "accuracy_vs_size.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v, rows in load.items():
        xs = [r["offered req/s"] for r in rows]
        ax.plot(xs, [r["TTFT p99 ms"] for r in rows], marker="o", label=f"{v} TTFT p99")
        ax.plot(xs, [r["E2EL p99 ms"] for r in rows], marker="s", ls="--", label=f"{v} E2E p99")
    ax.set(xlabel="offered rate (req/s)", ylabel="ms", title="Latency vs offered rate", yscale="log")
    ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(out / "latency_vs_rate.png", dpi=110); plt.close(fig)
    paths["latency_vs_rate"] = str(out / "latency_vs_rate.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v in load:
        ms = sorted(ttft_samples_ms(v, cfg.target_rate_req_per_s))
        if ms:
            ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=v)
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests",
           title=f"TTFT distribution at {cfg.target_rate_req_per_s:g} req/s")
    ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(out / "ttft_cdf.png", dpi=110); plt.close(fig)
    paths["ttft_cdf"] = str(out / "ttft_cdf.png")
    return paths


def run(cfg: ReportConfig) -> Report:
    out = OUT_DIR
    (out / "plots").mkdir(parents=True, exist_ok=True)
    prep = _load("prepare", "base")
    base_bytes = _nan(prep and prep.metrics.get("model_bytes"))
    base_eval = _load("evaluate", "base")
    base_ppl = _nan(base_eval and base_eval.metrics.get("ppl_word"))
    quant = [quant_row(v, base_bytes, base_ppl, cfg) for v in cfg.variants]
    load = {v: load_rows(v) for v in cfg.variants if load_rows(v)}
    decision = recommend(quant, load, cfg)

    # dvc metrics / plots inputs: flat numbers per variant, and tidy rows for the latency plot.
    per_variant = {row["variant"]: {k: v for k, v in row.items()
                                    if isinstance(v, float) and not math.isnan(v)} for row in quant}
    for v, rows in load.items():
        step = at_rate(rows, cfg.target_rate_req_per_s)
        per_variant.setdefault(v, {}).update(
            {"ttft_ms_p50_at_target": step["TTFT p50 ms"], "ttft_ms_p99_at_target": step["TTFT p99 ms"],
             "goodput_at_target": step["goodput"]})
    plot_rows = [{"variant": v, "offered_req_per_s": r["offered req/s"], "ttft_ms_p99": r["TTFT p99 ms"],
                  "e2el_ms_p99": r["E2EL p99 ms"]} for v, rows in load.items() for r in rows]
    write_json_atomic(out / "plots" / "latency_vs_rate.json", plot_rows)
    write_json_atomic(out / "plots" / "accuracy_vs_size.json", [
        {"variant": r["variant"], "mb": r["bytes"] / 1e6, "accuracy": r[cfg.accuracy_metric]}
        for r in quant if not math.isnan(r["bytes"] * r[cfg.accuracy_metric])])

    report = Report(
        stage="report", variant=VARIANT, config=cfg.model_dump(mode="json"),
        data_fingerprint={s: {v: (_load(s, v).provenance.git_sha if _load(s, v) else None)
                              for v in cfg.variants} for s in ("quantize", "evaluate", "loadtest")},
        metrics={f"{v}.{k}": x for v, d in per_variant.items() for k, x in d.items()},
        details={"quantization_table": quant, "load_table": [r for rows in load.values() for r in rows],
                 "recommendation": decision,
                 "missing": {v: [s for s in ("evaluate", "loadtest") + (() if v == "base" else ("quantize",))
                                 if _load(s, v) is None] for v in cfg.variants}},
    )
    write_report(report)
    write_json_atomic(METRICS_FILE, {"recommended": decision["variant"], **per_variant})
    try:
        report.outputs = plot(quant, load, cfg, out)
        write_report(report)
    except Exception as err:  # plots are a view; the report stands without them
        log.warning("report plots failed (%s: %s)", type(err).__name__, err)
    log.info("recommendation: %s", decision["reason"])
    return report


def track(run, report: Report) -> None:
    """The parent run gets plots and tables; each variant's parent run its headline numbers."""
    from workbench import tracking

    for path in report.outputs.values():
        run.log_artifact(Path(path), "plots")
    for name in ("latency_vs_rate.json", "accuracy_vs_size.json"):
        run.log_artifact(OUT_DIR / "plots" / name, "plots")
    html = OUT_DIR / "report.html"
    if html.exists():
        run.log_artifact(html)
    for row in report.details["quantization_table"]:
        v = row["variant"]
        nums = {k: x for k, x in report.metrics.items() if k.startswith(f"{v}.")}
        tracking.log_variant_summary(v, {k.split(".", 1)[1]: x for k, x in nums.items()})


def tables(report: Report):
    """(quantization table, load table, recommendation) as pandas DataFrames for the notebook."""
    import pandas as pd

    q = pd.DataFrame(report.details["quantization_table"])
    if not q.empty:
        q["MB"] = q.pop("bytes") / 1e6
    return q, pd.DataFrame(report.details["load_table"]), report.details["recommendation"]
