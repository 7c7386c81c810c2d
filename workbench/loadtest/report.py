"""The load test's reports and their views: raw records on disk, one report per arm
(``reports/loadtest/<arm>.json``, written first), its flat metrics, tables, plots, and MLflow.

Metric definitions: workbench/loadgen/metrics.py (as ``vllm bench serve``); the typed step and
rate summaries with their intervals: workbench/loadgen/summary.py. A table, a plot or an MLflow
key is a view of a report; nothing reads a view back.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

from workbench import stats, variants
from workbench.config import LoadtestConfig
from workbench.loadgen import summary
from workbench.loadgen.client import Record
from workbench.loadgen.knee import KneeResult
from workbench.loadgen.summary import RateSummary, StepSummary
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.reports import Report, sha256_file, write_report

log = logging.getLogger(__name__)
STAGE = "loadtest"
VARIANT = variants.ALL  # a compared run's own report (order, drift, comparisons); each arm has its own too


def point_label(rate: float, concurrency: int | None = None) -> str:
    """``rate_2`` / ``rate_inf`` for an offered rate, ``conc_4`` for a closed loop at 4 in flight."""
    from workbench.loadtest.plan import Point

    return Point(rate, concurrency).label


def write_records(result, out_dir: Path) -> Path:
    """A step's raw records, one JSON line each, to ``<out_dir>/step-<point>.jsonl``."""
    path = out_dir / f"step-{result.label.removeprefix('rate_')}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for rec in result.records:
            f.write(json.dumps(rec.to_dict()) + "\n")
    return path


def read_records(path: str | Path) -> list[Record]:
    """A step's raw records back from its JSONL file, or its gzip (``.jsonl.gz``, as results/ keep
    them); the report stage compares variants on them."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [Record(**json.loads(line)) for line in raw.decode("utf-8").splitlines() if line.strip()]


def workload_fingerprint(cfg: LoadtestConfig) -> dict:
    if cfg.workload.path and Path(cfg.workload.path).is_file():
        return {"workload": {"path": cfg.workload.path, "sha256": sha256_file(Path(cfg.workload.path))}}
    return {}


def flat_metrics(rates: list[RateSummary], knee: KneeResult | None) -> dict[str, float]:
    """MLflow / dvc view of the rate summaries: ``rate_1.ttft_ms_p99`` with ``_ci_lo``/``_ci_hi``."""
    out: dict[str, float] = {}

    def put(key: str, est: stats.Estimate) -> None:
        if est.value is None:
            return
        out[key] = est.value
        if est.lo is not None:
            out[f"{key}_ci_lo"] = est.lo
        if est.hi is not None:
            out[f"{key}_ci_hi"] = est.hi

    for r in rates:
        p = point_label(r.offered_req_per_s, r.concurrency)
        for name in ("achieved_req_per_s", "request_throughput_req_per_s", "output_tokens_per_s", "goodput"):
            put(f"{p}.{name}", getattr(r, name))
        for lat, dist in r.latency.items():
            for pct, est in dist.p.items():
                put(f"{p}.{lat}_ms_{pct}", est)
        out[f"{p}.requests"] = float(r.requests)
        out[f"{p}.slo_pass"] = {"pass": 1.0, "fail": 0.0}.get(r.slo.overall.value, 0.5)
    open_loop = [r for r in rates if r.concurrency is None]
    passed = [r.offered_req_per_s for r in open_loop if r.slo.overall is stats.Verdict.passed]
    not_failed = [r.offered_req_per_s for r in open_loop if r.slo.overall is not stats.Verdict.failed]
    out["slo_rate_req_per_s"] = max(passed, default=0.0)  # highest rate shown to meet the SLO
    out["slo_rate_not_failed_req_per_s"] = max(not_failed, default=0.0)
    tps = [r.output_tokens_per_s.value for r in rates if r.output_tokens_per_s.value is not None]
    out["max_output_tokens_per_s"] = max(tps, default=0.0)
    out["errors_total"] = float(sum(r.errors for r in rates))
    if knee is not None and knee.lo is not None:
        out["sustained_req_per_s"] = knee.lo
        out["sustained_req_per_s_ci_lo"] = knee.lo
        if knee.hi is not None:
            out["sustained_req_per_s_ci_hi"] = knee.hi
    return out


def table_rows(rates: list[RateSummary]) -> list[dict]:
    """The load table as text: every figure with its 95 % interval. A view, never read back."""
    rows = []
    for r in rates:
        lat = r.latency
        rows.append({
            "variant": r.variant, "offered req/s": f"{r.offered_req_per_s:g}" if r.concurrency is None
            else f"closed loop, {r.concurrency} in flight",
            "requests": f"{r.requests} ({r.repeats} rep.)",
            "achieved req/s": r.achieved_req_per_s.text(".3g"),
            "TTFT p50 ms": lat["ttft"].at(50).text(".0f"), "TTFT p99 ms": lat["ttft"].at(99).text(".0f"),
            "E2EL mean ms": f"{lat['e2el'].mean_ms:.0f}" if lat["e2el"].mean_ms is not None else "n/a",
            "E2EL p99 ms": lat["e2el"].at(99).text(".0f"), "TPOT p50 ms": lat["tpot"].at(50).text(".1f"),
            "output tok/s": r.output_tokens_per_s.text(".3g"),
            "goodput": r.goodput.text(".2f"), "SLO": r.slo.overall.value, "errors": r.errors,
            "steady state": r.steady_state or "",
            "utilization %": f"{r.utilization_pct:.0f} ({r.utilization_of})" if r.utilization_pct is not None else "",
            "limited by": ", ".join(r.limited_by),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no steps)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def not_servable(cfg: LoadtestConfig, variant: str, err: Exception, stage: str = STAGE) -> Report:
    """The report of a variant whose managed vLLM did not come up on this machine (e.g. vLLM-CPU's
    4-bit kernel needs AVX-512): no steps, the server's own reason, and a logged error."""
    msg = f"variant '{variant}' could not be served by vLLM on this machine; not load-tested"
    log.error("%s:\n%s", msg, str(err)[-2000:])
    report = Report(stage=stage, variant=variant, config=cfg.model_dump(mode="json"), metrics={},
                    details=ArmDetails.checked({"not_servable": msg, "server": {"managed": True,
                                                                                "error": str(err)[-4000:]},
                                                "steps": [], "rates": [], "table": []}))
    write_report(report)
    return report


def step_summaries(cfg: LoadtestConfig, done: list, outputs: dict[str, str]
                   ) -> tuple[list[StepSummary], dict[int, summary.Columns]]:
    """The typed summary of each measured step in ``done`` (executor.Done), and its columns by position."""
    cols = {d.position: summary.columns(d.result.records, cfg.slo) for d in done}
    steps = [summary.step_summary(
        d.arm.variant, d.result.label, d.result.rate, d.result.records, cfg.slo, d.result.metrics,
        cols=cols[d.position], repeat=d.repeat, position=d.position, role=d.role, started_unix=d.result.started_unix,
        limited_by=d.result.limited_by, records_file=outputs.get(f"records_{d.result.label}"),
        block=d.block, concurrency=d.result.concurrency, steady_state=d.result.steady_state)
        for d in done]
    return steps, cols


def steady_slo(slo: summary.SLOVerdict, steps: list[StepSummary]) -> summary.SLOVerdict:
    """The SLO verdict as far as its steps' steady state lets it stand (plan.effective_verdict): a
    step whose backlog grew makes it a fail, a step too short to tell turns a pass into undecided.
    A step that did not reach steady state is never reported as a pass."""
    from workbench.loadtest.plan import Outcome, effective_verdict

    overall = slo.overall
    for s in steps:
        verdict = (s.steady_state or {}).get("verdict")
        if verdict is not None:
            steady = {"steady": True, "not sustainable": False}.get(verdict)
            overall = effective_verdict(Outcome(overall, steady=steady))
    return slo if overall is slo.overall else slo.model_copy(update={"overall": overall})


def gate_by_steady_state(steps: list[StepSummary], rates: list[RateSummary]) -> None:
    """Each step's and each rate's SLO verdict through ``steady_slo`` (in place)."""
    for s in steps:
        s.slo = steady_slo(s.slo, [s])
    for r in rates:
        mine = [s for s in steps if s.variant == r.variant and s.offered_req_per_s == r.offered_req_per_s
                and s.concurrency == r.concurrency]
        r.slo = steady_slo(r.slo, mine)


def variant_report(cfg: LoadtestConfig, variant: str, done: list, knee: KneeResult | None,
                   server_info: dict, outputs: dict[str, str], run_id: str, stopped: str | None = None,
                   stage: str = STAGE) -> Report:
    """One arm's report from its measured steps; then its table and plots (views of it)."""
    mine = [d for d in done if d.arm.variant == variant]
    steps, cols = step_summaries(cfg, mine, outputs)
    rates = summary.rate_summaries(steps, cols, cfg.slo)
    gate_by_steady_state(steps, rates)
    report = Report(
        stage=stage, variant=variant, config=cfg.model_dump(mode="json"), data_fingerprint=workload_fingerprint(cfg),
        metrics=flat_metrics(rates, knee),
        details=ArmDetails.checked({
            "server": server_info, "run": run_id,
            "steps": [s.model_dump(mode="json") for s in steps],
            "rates": [r.model_dump(mode="json") for r in rates],
            "knee": knee.model_dump(mode="json") if knee else None,
            "step_metrics": {d.result.label: d.result.metrics for d in mine},
            "time_budget_stopped": stopped}),
        outputs=dict(outputs))
    write_report(report)  # the result; everything below is a view of it
    out_dir = Path(cfg.out_dir) / variant
    (out_dir / "summary.md").write_text(markdown(table_rows(rates)), encoding="utf-8")
    report.outputs["summary_md"] = str(out_dir / "summary.md")
    ttft_ms: dict[str, list[float]] = {}  # per load point, its repeats pooled
    for d, s in zip(mine, steps):
        key = f"{s.offered_req_per_s:g} req/s" if s.concurrency is None else f"{s.concurrency} in flight"
        ttft_ms.setdefault(key, []).extend(cols[d.position].ttft_ms.tolist())
    try:
        from workbench import plots

        report.outputs.update(plots.latency([r for r in rates if r.concurrency is None] or rates, ttft_ms, out_dir))
    except Exception as err:  # a plot is a view; the report stands without it
        log.warning("load-test plots failed (%s: %s)", type(err).__name__, err)
    write_report(report)
    met = f"sustained rate at the SLO {knee.text()}" if knee is not None else \
        f"SLO met (supported) up to {report.metrics['slo_rate_req_per_s']:.2f} req/s"
    log.info("loadtest %s: %d steps, %s -> %s", variant, len(steps), met, report.path)
    return report


def steps_of(report: Report) -> list[StepSummary]:
    return ArmDetails.of(report).steps


def rates_of(report: Report) -> list[RateSummary]:
    return ArmDetails.of(report).rates


def arm_reports(report: Report) -> list[Report]:
    """A compared run's (``all``) arm reports, or the one report itself."""
    from workbench.reports import read_report

    if report.variant != VARIANT:
        return [report]
    return [read_report(Path(p)) for p in ComparedDetails.of(report).reports.values()]


def drift_of(report: Report) -> dict | None:
    """The compared run's drift control (loadtest/compare.py), or None: one arm's report has none."""
    return ComparedDetails.of(report).drift if report.variant == VARIANT else None


def track(parent, report: Report) -> None:
    """Tables and plots as artifacts of the stage's run (``tracking.StageRun``), and one nested
    MLflow run per step (with its intervals as ``_ci_lo``/``_ci_hi`` metrics). A compared run's
    report (``all``) tracks each arm's report in turn."""
    from workbench import tracking

    for vr in arm_reports(report):
        for key in ("summary_md", "latency_vs_rate", "ttft_cdf"):
            if key in vr.outputs and Path(vr.outputs[key]).exists():
                parent.log_artifact(Path(vr.outputs[key]), f"loadtest/{vr.variant}")
        for step in steps_of(vr):
            tracking.log_child_run(parent, f"{STAGE}:{vr.variant}:{step.label}",
                                   {"offered_req_per_s": step.offered_req_per_s, "variant": vr.variant,
                                    "repeat": step.repeat, "role": step.role, "position": step.position,
                                    "block": step.block},
                                   ArmDetails.of(vr).step_metrics.get(step.label, {}))


def table(report: Report):
    """The per-rate table (every figure with its interval) for notebooks."""
    import pandas as pd

    return pd.DataFrame(table_rows([r for vr in arm_reports(report) for r in rates_of(vr)]))
