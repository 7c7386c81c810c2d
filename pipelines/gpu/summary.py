"""summary.md of a GPU run, a view of its reports: per compared arm (a variant, or a serving
configuration of one model as in params-serving-configs.yaml) the sustained rate with its bracket,
where it lies against the control, the table of every rate it was measured at (every figure with
its interval) and the drift verdict; then the shard and evaluate reports if the run had them.

    python -m pipelines.gpu.import_results runs/gpu-repro/results.tar.gz --results results/gpu-N

writes it (pipelines/gpu/import_results.py); nothing reads data back from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench import loadtest
from workbench.loadgen.knee import KneeResult
from workbench.loadtest.details import ArmDetails, ComparedDetails
from workbench.reports import Report, read_report
from workbench.stats import Verdict


def comparison_reports(comparison: Report, root: Path = Path(".")) -> dict[str, Report]:
    """Each compared arm's own report, read from a run's tree (``root``: an unpacked archive)."""
    return {name: read_report(root / path) for name, path in ComparedDetails.of(comparison).reports.items()
            if (root / path).is_file()}


def slo_text(slo: dict) -> str:
    good = ", ".join(f"{k.removesuffix('_ms').upper()} <= {slo[k]:g} ms" for k in ("ttft_ms", "tpot_ms", "e2el_ms")
                     if slo.get(k) is not None)
    ttft = f"TTFT p{slo['ttft_percentile']:g} <= {slo['ttft_ms']:g} ms and " if slo.get("ttft_ms") is not None else ""
    return (f"{ttft}goodput >= {slo['min_goodput']:.0%} (a request is good when {good or 'it succeeds'}), "
            "each decided by a binomial test on the requests")


def against_control(knee: KneeResult | None, control: KneeResult | None) -> str:
    """Where an arm's sustained rate lies against the control's, from their probes: it is resolved
    only where one passed a rate that the other was shown to fail (an undecided probe decides
    nothing)."""
    if knee is None or control is None:
        return "n/a (no knee search)"

    def rates(k: KneeResult, verdict: Verdict) -> list[float]:
        return [p.rate for p in k.probes if p.verdict is verdict]

    passed, failed = rates(knee, Verdict.passed), rates(knee, Verdict.failed)
    control_passed, control_failed = rates(control, Verdict.passed), rates(control, Verdict.failed)
    if passed and control_failed and max(passed) >= min(control_failed):
        return f"higher: passed {max(passed):.3g} req/s, the control failed {min(control_failed):.3g}"
    if failed and control_passed and min(failed) <= max(control_passed):
        return f"lower: failed {min(failed):.3g} req/s, the control passed {max(control_passed):.3g}"
    return "not resolved (no rate passed by one was shown to fail for the other)"


def comparison_verdict(drift: dict | None) -> str:
    if drift is None:
        return "unchecked: no drift control was measured (one arm)"
    if "drifted" in drift:  # a run from before issue 27 (results/gpu): one start/end gate
        if drift["drifted"]:
            return ("INVALID: the control drifted between the start and the end of the run, so the differences "
                    "between the arms are not evidence; run the comparison again")
        return "stands: no drift of the control was detected between the start and the end of the run"
    return ("paired within counterbalanced blocks: each arm against the control block by block "
            "(all.json `paired`, intervals over blocks); the control's drift is reported, not a gate")


def loadtest_summary(comparison: Report, reports: dict[str, Report]) -> dict:
    """The load-test part of summary.json, from the compared run's reports (``all`` and one per
    arm): the sustained rate of each with its bracket, the table of every rate it was measured at,
    the drift verdict and what it means."""
    cfg, compared = comparison.config, ComparedDetails.of(comparison)
    names, arms = compared.variants, {n: ArmDetails.of(r) for n, r in reports.items()}
    knees = {n: d.knee for n, d in arms.items() if d.knee}
    control = names[0] if names else None
    configs = []
    for name in names:
        entry = {"name": name, "server": cfg.get("server_overrides", {}).get(name, {})}
        rep = reports.get(name)
        if rep is None or arms[name].not_servable:
            entry["not_servable"] = arms[name].not_servable if rep else "no report came back"
            configs.append(entry)
            continue
        knee = knees.get(name)
        entry.update(
            sustained=knee.text() if knee else None, knee=knee.note if knee else None,
            probes=[f"{p.rate:.3g} {p.verdict.value}" + (f" ({p.repeats}x)" if p.repeats > 1 else "")
                    for p in knee.probes] if knee else [],
            slo_rate_req_per_s=rep.metrics.get("slo_rate_req_per_s"),
            against_control="control" if name == control else against_control(knee, knees.get(control)),
            rows=loadtest.table_rows(loadtest.rates_of(rep)))
        configs.append(entry)
    drift = compared.drift
    return {"run": compared.run, "finished_at": comparison.created_at, "mode": cfg["mode"],
            "control": control, "client_processes": cfg.get("client_processes", 1), "slo": slo_text(cfg["slo"]),
            "steps": len(compared.order),
            "first_round": [o["variant"] for o in compared.order][:max(len(names), 1)],
            "drift": drift["verdict"] if drift else None, "drifted": drift.get("drifted") if drift else None,
            "comparison": comparison_verdict(drift), "configurations": configs}


def loadtest_markdown(lt: dict) -> list[str]:
    search = ("a knee search per arm for the highest offered rate that meets the SLO"
              if lt["mode"] == "knee" else "a sweep of offered rates")
    lines = [f"## Load test: {len(lt['configurations'])} arms compared interleaved, control `{lt['control']}`", "",
             f"{search}: {lt['slo']}. {lt['client_processes']} client process(es); {lt['steps']} steps in "
             f"the order {' '.join(lt['first_round'])} ... (run {lt['run']}).", "",
             f"**Drift control**: {lt['drift'] or 'not measured'}", "",
             f"**Comparison**: {lt['comparison']}", "",
             "| arm | server (loadtest.server_overrides) | sustained req/s [passed, failed) "
             "| against the control | search |", "|---|---|---|---|---|"]
    for c in lt["configurations"]:
        server = ", ".join(f"{k}={v}" for k, v in c["server"].items()) or "loadtest.server"
        name = c["name"] + (" (control)" if c["name"] == lt["control"] else "")
        if "not_servable" in c:
            lines.append(f"| {name} | {server} | not servable | | {c['not_servable']} |")
            continue
        sustained = c["sustained"] or f"{c['slo_rate_req_per_s']:g} (highest swept rate shown to pass)"
        lines.append(f"| {name} | {server} | {sustained} | {c['against_control']} | {c['knee'] or ''} |")
    lines.append("")
    for c in lt["configurations"]:
        if "rows" in c:
            lines += [f"### {c['name']}" + (f": probes {', '.join(c['probes'])}" if c["probes"] else ""), "",
                      loadtest.markdown(c["rows"])]
    return lines


def markdown(summary: dict) -> str:
    lines = [f"# GPU run: {summary.get('gpu', '?')}, vLLM {summary.get('vllm', '?')}", ""]
    if summary.get("loadtest"):
        lines += loadtest_markdown(summary["loadtest"])
    for k in ("shard", "evaluate"):
        if k in summary:
            lines += [f"## {k}", "", "```", json.dumps(summary[k], indent=1, default=str), "```", ""]
    return "\n".join(lines)
