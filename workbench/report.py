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

import contextlib
import logging
from pathlib import Path

from workbench import evaluate, loadtest, plots, power, report_arms, stats, variants
from workbench.config import LoadtestConfig, ReportConfig, SLOConfig
from workbench.cost import cost_per_million_output_tokens
from workbench.evaluate.details import EvaluateDetails
from workbench.loadgen import summary
from workbench.loadgen.summary import RateSummary
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.quantize.details import QuantizeDetails
from workbench.recommend import Candidate, Decision, accuracy_diff, ppl_change, recommend
from workbench.recommend_evidence import Document
from workbench.report_arms import sustained_rate
from workbench.report_details import ArmPoint, FinalReport, QuantRow, ReportDetails
from workbench.reports import Report, read_report, report_path, write_json_atomic, write_report

log = logging.getLogger(__name__)
VARIANT = variants.ALL  # its MLflow run is top-level, not under a variant (tracking)
OUT_DIR = Path("reports/report")
METRICS_FILE = Path("metrics.json")
SUMMARY_FILE = "summary.md"  # reports/report/summary.md: recommendation, arms, picture, load table
SUITES = ("mmlu", "ceval")


def _load(stage: str, variant: str) -> Report | None:
    path = report_path(stage, variant)
    if not path.exists():
        return None
    try:
        return read_report(path)
    except ValueError as err:
        log.warning("skipping %s: %s", path, err)
        return None


def at_rate(rates: list[RateSummary], rate: float) -> RateSummary | None:
    """The summary offered at ``rate`` (the nearest one at or above it, else the highest)."""
    if not rates:
        return None
    above = [r for r in rates if r.offered_req_per_s >= rate - 1e-9]
    return min(above, key=lambda r: r.offered_req_per_s) if above else max(rates, key=lambda r: r.offered_req_per_s)


def latencies_at(lt: Report, rate: float) -> dict[str, list[float]]:
    """TTFT and E2EL (ms) of every measured request offered at ``rate`` (all its repeats), as the
    load test's own ``summary.columns`` extracts them from the raw records."""
    slo = LoadtestConfig.model_validate(lt.config).slo if lt.config else SLOConfig()
    cols = [summary.columns(loadtest.read_records(s.records_file), slo) for s in loadtest.steps_of(lt)
            if s.offered_req_per_s == rate and s.role != "control-end" and s.records_file
            and Path(s.records_file).exists()]
    return {k: [float(x) for c in cols for x in getattr(c, f"{k}_ms")] for k in ("ttft", "e2el")}


def e2el_blocks_at(lt: Report, rate: float) -> dict[int, float]:
    """The E2E p50 (ms) of each block's steady step at ``rate``: the speed comparison's unit. A
    report without blocks (an older one) is keyed by repeat; a step that did not reach steady
    state is left out (it measured a ramp, not the rate)."""
    out: dict[int, float] = {}
    for s in loadtest.steps_of(lt):
        if s.offered_req_per_s != rate or s.role == "control-end":
            continue
        if s.steady_state is not None and s.steady_state.get("verdict", "steady") != "steady":
            continue
        p50 = s.latency["e2el"].at(50).value if "e2el" in s.latency else None
        if p50 is not None:
            out[s.block if s.block is not None else s.repeat] = p50
    return out


def tokens_per_request(lt: Report, rate: float) -> tuple[float | None, float | None]:
    """Mean (prompt, completion) tokens of the measured, successful requests offered at ``rate``,
    from the server's usage in the raw records: the token mix a price per token applies to."""
    recs = [r for s in loadtest.steps_of(lt) if s.offered_req_per_s == rate and s.records_file
            and Path(s.records_file).exists() for r in loadtest.read_records(s.records_file)
            if r.success and not r.warmup and r.completion_tokens]
    if not recs:
        return None, None
    return (sum(r.prompt_tokens or 0 for r in recs) / len(recs),
            sum(r.completion_tokens for r in recs) / len(recs))


def arm_cost(variant: str, lt: Report, load: RateSummary, cfg: ReportConfig) -> stats.Estimate | None:
    """``report.prices[variant]`` per 1e6 output tokens at the arm's sustained SLO rate, or None
    without a price."""
    price = cfg.prices.get(variant)
    if price is None:
        return None
    tokens_in, tokens_out = tokens_per_request(lt, load.offered_req_per_s)
    return cost_per_million_output_tokens(price, sustained_rate(lt), tokens_in, tokens_out)


def candidate(variant: str, base_bytes: float | None, cfg: ReportConfig) -> tuple[Candidate, dict]:
    """A variant's evidence for the recommender, and what else its table row needs."""
    q, e, lt = _load("quantize", variant), _load("evaluate", variant), _load("loadtest", variant)
    unquantized = variant == variants.BASE  # prepare's folder: no quantize report, its size from prepare's
    c = Candidate(variant=variant, bytes=base_bytes if unquantized else (q and q.metrics.get("model_bytes")),
                  broken=bool(q and q.metrics.get("broken")))
    extra: dict = {"method": "reference" if unquantized else (QuantizeDetails.of(q).method if q else None)}
    ed = EvaluateDetails.of(e) if e is not None else None
    if ed is not None and ed.evaluated:
        c.evaluated = True
        samples = Path(e.outputs.get("samples", ""))
        if samples.is_dir():
            for s in SUITES:
                with contextlib.suppress(FileNotFoundError):
                    c.questions[s] = evaluate.question_records(samples, s)
            with contextlib.suppress(FileNotFoundError):
                c.documents = {d: Document(*rec) for d, rec in evaluate.document_records(samples).items()}
        for s in SUITES:
            if c.questions.get(s):
                rec = c.questions[s]
                c.accuracy[s] = stats.proportion(sum(rec.values()), len(rec))
        if c.documents:
            ll, words, pages = zip(*c.documents.values())
            c.ppl = stats.perplexity(ll, words, clusters=pages)
        elif e.metrics.get("ppl_word") is not None:
            c.ppl = stats.Estimate(value=e.metrics["ppl_word"], n=0, note="no per-document records")
        extra["backend"] = ed.backend.name if ed.backend else None
    ld = ArmDetails.of(lt) if lt is not None else None
    if ld is not None and ld.rates:
        rates = ld.rates
        c.load = at_rate(rates, cfg.target_rate_req_per_s)
        c.e2el_ms = latencies_at(lt, c.load.offered_req_per_s)["e2el"]
        c.e2el_blocks = e2el_blocks_at(lt, c.load.offered_req_per_s)
        c.cost = arm_cost(variant, lt, c.load, cfg)
        if c.cost is not None:
            c.cost_currency = cfg.prices[variant].currency
            extra["cost"] = c.cost
        extra["rates"] = rates
        extra["tpot_low_load"] = min(rates, key=lambda r: r.offered_req_per_s).latency["tpot"].at(50)
        extra["knee"] = ld.knee
    elif ld is not None:
        extra["load_note"] = ld.not_servable
    return c, extra


def quant_row(c: Candidate, extra: dict, ref: Candidate | None, base_bytes: float | None) -> QuantRow:
    """One row of the quantization table; ``ref`` is the baseline's evidence (None: no comparisons)."""
    other = ref is not None and c is not ref
    return QuantRow(
        variant=c.variant, method=extra.get("method"), bytes=c.bytes,
        compression=base_bytes / c.bytes if base_bytes and c.bytes else None, broken=c.broken,
        tpot_ms_p50_low_load=extra.get("tpot_low_load"), ppl_word=c.ppl, backend=extra.get("backend"),
        ppl_change_vs_base=ppl_change(c, ref) if other else None,
        **{f"{s}_acc": c.accuracy.get(s) for s in SUITES},
        **{f"{s}_vs_base": accuracy_diff(c, ref, s) if other else None for s in SUITES},
        sustained_req_per_s=extra.get("knee"),
        cost_per_million_output_tokens=extra.get("cost"))  # report.prices, at the sustained rate


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

