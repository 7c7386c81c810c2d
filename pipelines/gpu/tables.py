"""The GPU comparison's two tables, as markdown, from a run's reports (every figure with its interval).

    python -m pipelines.gpu.tables results/gpu-2 > results/gpu-2/tables.md

Reads ``<root>/reports/``: the report stage's ``report/all.json`` (one row per variant: size, decode
speed at low load, sustained rate at the SLO, perplexity and accuracy against base, the
recommendation) and the load test's ``loadtest/all.json`` (the run's order, drift check and gateway
comparison) and ``loadtest/<variant>.json`` (the recommended variant's steps). A view of the
reports, never read back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench import loadtest, stats, variants
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.report import cell_text, tables
from workbench.report_details import ReportDetails
from workbench.reports import read_report


def _ci(metrics: dict, key: str, fmt: str) -> str:
    if metrics.get(key) is None:
        return "n/a"
    lo, hi = metrics.get(f"{key}_ci_lo"), metrics.get(f"{key}_ci_hi")
    return stats.Estimate(value=metrics[key], lo=lo, hi=hi, n=0).text(fmt)


def variants_table(report) -> str:
    """Table 4.2: per variant, size, TPOT p50 at low load, sustained rate, quality against base."""
    rows = ["| variant | method | size MB (x of base) | TPOT p50 ms at low load | sustained req/s at the SLO "
            "[pass, fail) | perplexity vs base | MMLU vs base | C-Eval vs base |",
            "|---|---|---|---|---|---|---|---|"]
    d = ReportDetails.of(report)
    base_bytes = next((r.bytes for r in d.quantization_table if r.variant == variants.BASE), None)
    for r in d.quantization_table:
        size = f"{r.bytes / 1e6:.1f} ({r.bytes / base_bytes:.3f})" if r.bytes and base_bytes else "n/a"
        knee = r.sustained_req_per_s.text() if r.sustained_req_per_s else "n/a"
        blank = "(reference)" if r.variant == d.baseline else "n/a"
        rows.append(f"| {r.variant} | {r.method} | {size} | {cell_text(r.tpot_ms_p50_low_load, '.2f') or 'n/a'} "
                    f"| {knee} | {cell_text(r.ppl_change_vs_base, '+.1f', ' %') or blank} "
                    f"| {cell_text(r.mmlu_vs_base, '+.3f') or blank} | {cell_text(r.ceval_vs_base, '+.3f') or blank} |")
    return "\n".join(rows)


def rates_table(lt_report) -> str:
    """Table 6.2: one variant's steps in rate order: TTFT, mean latency, GPU utilization, goodput."""
    rows = ["| offered req/s | step | achieved req/s | TTFT p50 ms | TTFT p99 ms | mean E2E latency ms "
            "| GPU util % (mean of samples) | goodput | SLO |",
            "|---|---|---|---|---|---|---|---|---|"]
    per_step = ArmDetails.of(lt_report).step_metrics
    for s in sorted(loadtest.steps_of(lt_report), key=lambda s: (s.offered_req_per_s, s.position)):
        m = per_step.get(s.label, {})
        util_key = f"{s.utilization_of or 'gpu'}_util_pct_mean"
        rows.append(f"| {s.offered_req_per_s:g} | {s.label} ({s.role}) | {s.achieved_req_per_s or 0:.1f} "
                    f"| {s.latency['ttft'].at(50).text('.1f')} | {s.latency['ttft'].at(99).text('.0f')} "
                    f"| {_ci(m, 'e2el_ms_mean', '.0f')} | {_ci(m, util_key, '.1f')} "
                    f"| {s.goodput.text('.3f')} | {s.slo.overall.value} |")
    return "\n".join(rows)


def gateway_block(all_lt) -> str:
    lines = []
    for arm, g in ComparedDetails.of(all_lt).gateway.items():
        ratio = g.get("sustained_ratio")
        text = stats.Estimate.model_validate(ratio).text(".2f") if ratio else "n/a"
        rates = g.get("sustained_req_per_s") or {}
        lines.append(f"- **{arm}**: sustained {rates.get('gateway')} req/s through the gateway, "
                     f"{rates.get('direct')} direct; ratio gateway / direct {text} (from the knees' brackets)")
        for row in g.get("per_rate", []):
            parts = [f"{k.split('_')[0].upper()} x{stats.Comparison.model_validate(row[k]).text('.2f')}"
                     for k in ("ttft_gateway_over_direct", "e2el_gateway_over_direct")]
            lines.append(f"  - {row['offered_req_per_s']:g} req/s (SLO direct {row['slo_direct']}, gateway "
                         f"{row['slo_gateway']}): " + "; ".join(parts))
    return "\n".join(lines) or "(no gateway arm)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a run's folder holding reports/, or the reports themselves as "
                    "import_results copies them (e.g. results/gpu-2)")
    a = ap.parse_args(argv)
    root = Path(a.root)
    reports = root / "reports" if (root / "reports").is_dir() else root  # a run's tree, or import_results' copy
    report = read_report(reports / f"report/{variants.ALL}.json")
    rec = ReportDetails.of(report).recommendation
    out = ["## The variants (seed table 4.2)", "", variants_table(report), ""]
    q, _, _ = tables(report)
    out += ["Every column as the report stage prints it:", "", q.to_markdown(index=False), ""]
    out += [f"## Recommendation: {rec.variant}", "", rec.reason, ""]
    all_lt = read_report(reports / f"loadtest/{variants.ALL}.json")
    shown = rec.variant or variants.BASE
    out += [f"## Offered rate against latency and GPU utilization: {shown} (seed table 6.2)", "",
            rates_table(read_report(reports / f"loadtest/{shown}.json")), ""]
    drift = ComparedDetails.of(all_lt).drift
    out += ["## Drift control", "", drift["verdict"] if drift else "(none in this run)", ""]
    out += ["## The gateway in the path", "", gateway_block(all_lt), ""]
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
