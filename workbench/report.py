"""Stage ``report``: every variant's reports side by side, the two comparison tables
(quantization, load) with an interval on every figure, and a recommendation decided on evidence
(``workbench.recommend``).

    python -m pipelines.run_stage report         # as DVC runs it (also exports the notebook to HTML)
    workbench report                             # the same run(cfg), without the notebook

Reads only other stages' reports (reports/<stage>/<variant>.json) and the raw records they point
at: per-question and per-document records of evaluate (for paired comparisons between any two
variants) and the load test's per-request records (for speed at the target rate). Writes
reports/report/all.json (the result; its ``metrics`` hold every variant's headline numbers with
``_ci_lo``/``_ci_hi``), metrics.json (for ``dvc metrics show``: the recommended variant's few
deciding numbers, one screen wide; see ``metrics_file``), plot data under reports/report/plots/
and PNG plots with error bars.

The quantization table: size, compression, decode speed (TPOT p50 at the lowest offered
rate), perplexity and its paired change to the baseline (``evaluate.baseline``, base by default),
accuracy and its paired difference to it. all.json's ``details`` are typed
(``report_details.ReportDetails``; JSON Schema docs/schemas/report.json).
The load table: per variant and offered rate, achieved rate, TTFT / E2EL percentiles,
goodput and the SLO verdict, utilization. Intervals are 95 %; see README "Reading the report".
"""

from __future__ import annotations

import logging
from pathlib import Path

from workbench import loadtest, plots, power, report_arms, stats, variants
from workbench.config import ReportConfig
from workbench.loadgen import summary
from workbench.loadgen.summary import RateSummary
from workbench.loadtest.details import ComparedDetails
from workbench.recommend import Candidate, Decision, ppl_change, recommend
from workbench.report_details import ArmPoint, FinalReport, QuantRow, ReportDetails
from workbench.report_evidence import SUITES, _load, candidate, latencies_at, quant_row
from workbench.reports import Report, write_json_atomic, write_report

log = logging.getLogger(__name__)
VARIANT = variants.ALL  # its MLflow run is top-level, not under a variant (tracking)
OUT_DIR = Path("reports/report")
METRICS_FILE = Path("metrics.json")
SUMMARY_FILE = "summary.md"  # reports/report/summary.md: recommendation, arms, picture, load table


def headline(row: QuantRow, load: RateSummary | None) -> dict[str, float]:
    """A variant's numbers for ``dvc metrics show`` and MLflow: each with ``_ci_lo``/``_ci_hi``."""
    out: dict[str, float] = {}

    def put(key: str, est: stats.Estimate | None) -> None:
        if est is None or est.value is None:
            return
        out[key] = round(est.value, 6)
        for side in ("lo", "hi"):
            if getattr(est, side) is not None:
                out[f"{key}_ci_{side}"] = round(getattr(est, side), 6)

    if row.bytes:
        out["mb"] = round(row.bytes / 1e6, 1)
    put("ppl_word", row.ppl_word)
    if row.ppl_change_vs_base is not None:
        put("ppl_change_pct", row.ppl_change_vs_base.diff)
    for s in SUITES:
        put(f"{s}_acc", getattr(row, f"{s}_acc"))
    if load is not None:
        put("ttft_ms_p99_at_target", load.latency["ttft"].at(99))
        put("goodput_at_target", load.goodput)
        out["slo_at_target"] = {"pass": 1.0, "fail": 0.0}.get(load.slo.overall.value, 0.5)
    put("cost_per_million_output_tokens", row.cost_per_million_output_tokens)
    return out


# metrics.json's columns: short name -> the key of ``headline``. Only the recommended variant's, so
# that ``dvc metrics show`` (one column per key) fits on a screen; every variant's numbers are in
# all.json's ``metrics``, in MLflow and in the report's tables.
# (The SLO verdict stands for goodput: it is the binomial test of it.)
_METRICS_COLUMNS = {"mb": "mb", "ppl_pct": "ppl_change_pct", "acc": "{acc}", "ttft_p99": "ttft_ms_p99_at_target"}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def metrics_file(variant: str | None, numbers: dict[str, float], drifted: bool,
                 cfg: ReportConfig) -> dict[str, object]:
    """The content of metrics.json: which variant was recommended and the numbers it was chosen on,
    each value with its interval as ``_lo``/``_hi`` (4 significant digits): size in MB, perplexity
    change against the baseline in % (absent when the baseline is chosen), ``report.accuracy_metric`` as ``acc``,
    TTFT p99 in ms at the target rate; then the SLO verdict there (1 pass, 0 fail, 0.5 undecided)
    and whether the load test's drift control fired."""
    out: dict[str, object] = {"recommended": variant or "none"}
    for short, key in _METRICS_COLUMNS.items():
        key = key.format(acc=cfg.accuracy_metric)
        if key not in numbers:
            continue
        out[short] = _sig(numbers[key])
        for side in ("lo", "hi"):
            if f"{key}_ci_{side}" in numbers:
                out[f"{short}_{side}"] = _sig(numbers[f"{key}_ci_{side}"])
    if "slo_at_target" in numbers:
        out["slo"] = numbers["slo_at_target"]
    out["drift"] = float(drifted)
    return out


def run(cfg: ReportConfig) -> FinalReport:
    if cfg.variants is None:
        raise ValueError("report.variants is null: list the variants, or read the config through "
                         "params.yaml (null there = base and every quantize.variants key)")
    out = OUT_DIR
    (out / "plots").mkdir(parents=True, exist_ok=True)
    prep = _load("prepare", variants.BASE)
    base_bytes = prep and prep.metrics.get("model_bytes")
    evidence = {v: candidate(v, base_bytes, cfg) for v in cfg.variants}
    cands = [c for c, _ in evidence.values()]
    ref = evidence[cfg.baseline][0] if cfg.baseline in evidence else None
    ref = ref if ref is not None and ref.evaluated else None
    compared = _load("loadtest", loadtest.VARIANT)
    # all.json's drift: the control's spread over the run's blocks (loadtest/compare.py)
    cd = ComparedDetails.of(compared) if compared else None
    drifted = bool(cd and cd.drifted)
    decision = recommend(cands, cfg, drifted=drifted)
    decision.power = power.statements([c for c in cands if c.variant not in decision.rejected], cfg)

    rows = [quant_row(c, x, ref, base_bytes) for c, x in evidence.values()]
    arms = [report_arms.arm_point(c, _load("loadtest", c.variant), _load("evaluate", c.variant), cfg) for c in cands]
    load_rates = [r for _, x in evidence.values() for r in x.get("rates", [])]
    per_variant = {c.variant: headline(row, c.load) for c, row in zip(cands, rows)}
    metrics_json = metrics_file(decision.variant, per_variant.get(decision.variant, {}), drifted, cfg)

    write_json_atomic(out / "plots" / "latency_vs_rate.json", [
        {"variant": r.variant, "offered_req_per_s": r.offered_req_per_s,
         "ttft_ms_p99": r.latency["ttft"].at(99).value, "ttft_ms_p99_ci_lo": r.latency["ttft"].at(99).lo,
         "ttft_ms_p99_ci_hi": r.latency["ttft"].at(99).hi, "e2el_ms_p99": r.latency["e2el"].at(99).value}
        for r in load_rates])
    write_json_atomic(out / "plots" / "quality_rate_cost.json", report_arms.plot_rows(arms))
    acc_key = cfg.accuracy_metric.removesuffix("_acc")
    write_json_atomic(out / "plots" / "accuracy_vs_size.json", [
        {"variant": c.variant, "mb": c.bytes / 1e6, "accuracy": c.accuracy[acc_key].value,
         "accuracy_ci_lo": c.accuracy[acc_key].lo, "accuracy_ci_hi": c.accuracy[acc_key].hi}
        for c in cands if c.bytes and acc_key in c.accuracy])

    report = FinalReport(
        stage="report", variant=VARIANT, config=cfg.model_dump(mode="json"),
        data_fingerprint={s: {v: (r.provenance.git_sha if (r := _load(s, v)) else None) for v in cfg.variants}
                          for s in ("quantize", "evaluate", "loadtest")},
        metrics={f"{v}.{k}": x for v, d in per_variant.items() for k, x in d.items()},
        details=ReportDetails(
            quantization_table=rows, load_table=load_rates, recommendation=decision,
            drift=cd.drift if cd else None, level=stats.LEVEL, baseline=cfg.baseline,
            # loadtest.gateway_arms: "<variant>@gateway" arms, shown here, never candidates
            gateway=(cd.gateway or None) if cd else None,
            missing={v: [s for s in ("evaluate", "loadtest") + (() if v == variants.BASE else ("quantize",))
                         if _load(s, v) is None] for v in cfg.variants},
            arms=arms),
    )
    write_report(report)
    write_json_atomic(METRICS_FILE, metrics_json)
    try:
        report.outputs = draw(cands, load_rates, arms, cfg, out)
        write_report(report)
    except Exception as err:  # plots are a view; the report stands without them
        log.warning("report plots failed (%s: %s)", type(err).__name__, err)
    summary = out / SUMMARY_FILE  # a view of the report just written, with the picture beside it
    picture = report.outputs.get("quality_rate_cost")
    summary.write_text(report_arms.summary_markdown(decision, arms, loadtest.markdown(loadtest.table_rows(load_rates)),
                                                    picture and Path(picture).name), encoding="utf-8")
    report.outputs["summary_md"] = str(summary)
    write_report(report)
    log.info("recommendation: %s", decision.reason)
    for line in decision.power:
        log.info("%s", line)
    return report


def draw(cands: list[Candidate], rates: list[RateSummary], arms: list[ArmPoint], cfg: ReportConfig,
         out: Path) -> dict[str, str]:
    acc_key = cfg.accuracy_metric.removesuffix("_acc")
    paths = {"accuracy_vs_size": plots.accuracy_vs_size(
        [(c.variant, c.bytes / 1e6, c.accuracy[acc_key]) for c in cands if c.bytes and acc_key in c.accuracy],
        out / "accuracy_vs_size.png", cfg.accuracy_metric),
        "quality_rate_cost": plots.quality_rate_cost(arms, out / "quality_rate_cost.png", cfg.accuracy_metric)}
    if rates:
        ttft = {}
        for c in cands:
            lt = _load("loadtest", c.variant)
            if lt is not None and c.load is not None:
                ttft[c.variant] = latencies_at(lt, c.load.offered_req_per_s)["ttft"]
        paths.update(plots.latency(rates, ttft, out, f"TTFT at {cfg.target_rate_req_per_s:g} req/s (CDF)"))
    return paths


def track(run, report: Report) -> None:
    """The parent run gets plots and tables; each variant's parent run its headline numbers."""
    from workbench import tracking

    for key, path in report.outputs.items():  # the PNGs under plots/, summary.md beside report.json
        run.log_artifact(Path(path), None if key == "summary_md" else "plots")
    for name in ("latency_vs_rate.json", "accuracy_vs_size.json", "quality_rate_cost.json"):
        run.log_artifact(OUT_DIR / "plots" / name, "plots")
    html = OUT_DIR / "report.html"
    if html.exists():
        run.log_artifact(html)
    for row in ReportDetails.of(report).quantization_table:
        v = row.variant
        nums = {k: x for k, x in report.metrics.items() if k.startswith(f"{v}.")}
        tracking.log_variant_summary(v, {k.split(".", 1)[1]: x for k, x in nums.items()})


def cell_text(x: stats.Estimate | stats.Comparison | None, fmt: str, unit: str = "") -> str:
    """One table cell: an Estimate or a Comparison as text with its interval ("" for none)."""
    return "" if x is None else x.text(fmt, unit=unit)


def tables(report: Report) -> tuple:
    """(quantization table, load table) as pandas DataFrames of text, each figure with its 95 %
    interval, and the recommendation (``recommend.Decision``). Views of the report's typed rows;
    "vs <baseline>" columns compare with the report's baseline."""
    import pandas as pd

    d = ReportDetails.of(report)
    ref = d.baseline or "baseline"
    q = pd.DataFrame([{
        "variant": r.variant, "method": r.method,
        "MB": f"{r.bytes / 1e6:.1f}" if r.bytes else "",
        "compression": f"{r.compression:.2f}x" if r.compression else "",
        "TPOT p50 ms (low load)": cell_text(r.tpot_ms_p50_low_load, ".1f"),
        "perplexity": cell_text(r.ppl_word, ".2f"),
        f"perplexity vs {ref}": cell_text(r.ppl_change_vs_base, "+.1f", " %"),
        **{f"{s} acc": cell_text(getattr(r, f"{s}_acc"), ".3f") for s in SUITES},
        **{f"{s} vs {ref}": cell_text(getattr(r, f"{s}_vs_base"), "+.3f") for s in SUITES},
        "sustained req/s (SLO)": r.sustained_req_per_s.text() if r.sustained_req_per_s else "",
        "broken": "yes" if r.broken else "",
    } for r in d.quantization_table])
    decision: Decision = d.recommendation
    return q, pd.DataFrame(loadtest.table_rows(d.load_table)), decision
