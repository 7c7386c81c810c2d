"""The GPU run, on the device machine: prepare, one interleaved load test of the plan's serving
configurations, cross-check, shard, evaluate.

    python3 pipelines/gpu/gpu_run.py --out $OUT                      # every phase of plan.yaml
    python3 pipelines/gpu/gpu_run.py --out $OUT --only loadtest crosscheck

Runs the workbench's own stages (workbench.prepare / loadtest / shard / evaluate ``run(cfg)``) with
CUDA vLLM, from plan.yaml over params.yaml, in this checkout. The load-test phase is ONE
``loadtest.run(cfg)`` comparing the plan's ``configurations`` (their servers up together, probes
in counterbalanced blocks, a seeded random order within each; the first configuration is the
control, its spread over the blocks the drift). Reports land in reports/ as on any machine; after
every phase the reports, load tables, plots and server-log tails are packed into ``<out>/gpu-results.tar.gz`` (so a run cut short
still returns the phases it finished), and ``<out>/summary.md`` shows per configuration the
sustained rate with its bracket, the per-rate table with intervals, and the drift verdict.
pipelines/gpu/README.md has the whole procedure; ``python -m pipelines.gpu.import_results`` logs
the returned reports to MLflow on your machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
if not __package__:  # run as a script (python3 pipelines/gpu/gpu_run.py): this checkout's workbench
    sys.path.insert(0, str(ROOT))

from workbench import loadtest, logconfig, variants  # noqa: E402
from workbench.config import LoadtestConfig, ServerConfig, deep_merge, load_params  # noqa: E402
from workbench.loadgen.knee import KneeResult  # noqa: E402
from workbench.reports import Report, read_report  # noqa: E402
from workbench.stages import STAGES  # noqa: E402
from workbench.stats import Verdict  # noqa: E402

log = logging.getLogger("gpu_run")
PLAN = Path(__file__).with_name("plan.yaml")
STATE = Path("runs/gpu")  # relative to the checkout: main() works from ROOT
PHASES = ("prepare", "loadtest", "crosscheck", "shard", "evaluate")


def server_cfg(plan: dict, params, over: dict) -> ServerConfig:
    merged = deep_merge(deep_merge(params.serve.chat.model_dump(), plan.get("server", {})), over)
    return ServerConfig.model_validate({**merged, "model_dir": plan["model_dir"]})


def loadtest_cfg(plan: dict, params) -> LoadtestConfig:
    """One load test comparing the plan's configurations: ``variants`` are their names (the first
    is the control), ``server_overrides`` their serve.chat keys, over plan.yaml's ``server``."""
    lt = deep_merge(params.loadtest.model_dump(), plan["loadtest"])
    configurations = {name: dict(over or {}) for name, over in plan["configurations"].items()}
    lt.update(server=server_cfg(plan, params, {}).model_dump(), model_dir=plan["model_dir"],
              variants=list(configurations), server_overrides=configurations,
              base_url=None, out_dir="runs/loadtest")  # managed servers, one per configuration
    return LoadtestConfig.model_validate(lt)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host_state() -> dict:
    """What this host's CPUs looked like around a phase: the CPU set and cgroup quota we run
    under, throttling so far, steal time and load, and the busiest processes (a leftover vLLM, a
    neighbour). The 2026-11-28 run saw the same configuration sustain 150 req/s, then 75."""
    import psutil

    t = psutil.cpu_times_percent(interval=1.0)
    top = []
    procs = list(psutil.process_iter(["pid", "name"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    for p in procs:
        try:
            top.append((p.cpu_percent(None), p.info["pid"], " ".join(p.cmdline())[:80] or p.info["name"]))
        except psutil.Error:
            continue
    top.sort(reverse=True)
    return {"at": time.strftime("%H:%M:%S"), "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
            "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max") or _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            "cgroup_cpu_stat": _read("/sys/fs/cgroup/cpu.stat"),
            "cpu_pct": {k: getattr(t, k) for k in ("user", "system", "idle", "steal") if hasattr(t, k)},
            "cpu_mhz": psutil.cpu_freq().current if psutil.cpu_freq() else None,
            "top": [f"{c:.0f}% {pid} {cmd}" for c, pid, cmd in top[:8]]}


def phase_prepare(plan, params) -> None:
    cfg = params.prepare.model_copy(update={"out_dir": plan["model_dir"], "embedding": None})
    STAGES["prepare"].run(cfg)


def phase_loadtest(plan, params) -> dict:
    comparison = STAGES["loadtest"].run(loadtest_cfg(plan, params))
    return loadtest_summary(comparison, comparison_reports(comparison))


def comparison_reports(comparison: Report, root: Path = Path(".")) -> dict[str, Report]:
    """Each compared configuration's own report, read from the checkout (or an unpacked ``root``)."""
    return {name: read_report(root / path) for name, path in comparison.details["reports"].items()
            if (root / path).is_file()}


def slo_text(slo: dict) -> str:
    good = ", ".join(f"{k.removesuffix('_ms').upper()} <= {slo[k]:g} ms" for k in ("ttft_ms", "tpot_ms", "e2el_ms")
                     if slo.get(k) is not None)
    ttft = f"TTFT p{slo['ttft_percentile']:g} <= {slo['ttft_ms']:g} ms and " if slo.get("ttft_ms") is not None else ""
    return (f"{ttft}goodput >= {slo['min_goodput']:.0%} (a request is good when {good or 'it succeeds'}), "
            "each decided by a binomial test on the requests")


def against_control(knee: KneeResult | None, control: KneeResult | None) -> str:
    """Where a configuration's sustained rate lies against the control's, from their probes: it
    is resolved only where one passed a rate that the other was shown to fail (an undecided probe
    decides nothing)."""
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
        return "unchecked: no drift control was measured (one configuration)"
    if "drifted" in drift:  # a run from before issue 27: one start/end gate
        if drift["drifted"]:
            return ("INVALID: the control drifted between the start and the end of the run, so the differences "
                    "between the configurations are not evidence; run the comparison again")
        return "stands: no drift of the control was detected between the start and the end of the run"
    return ("paired within counterbalanced blocks: each configuration against the control block by block "
            "(all.json `paired`, intervals over blocks); the control's drift is reported, not a gate")


def loadtest_summary(comparison: Report, reports: dict[str, Report]) -> dict:
    """The load-test part of summary.json, a view of the compared run's reports (``all`` and one
    per configuration): the sustained rate of each with its bracket, the table of every rate it
    was measured at (every figure with its interval), the drift verdict and what it means."""
    cfg, names = comparison.config, comparison.details["variants"]
    knees = {n: KneeResult.model_validate(r.details["knee"]) for n, r in reports.items() if r.details.get("knee")}
    control = names[0] if names else None
    configs = []
    for name in names:
        entry = {"name": name, "server": cfg.get("server_overrides", {}).get(name, {})}
        rep = reports.get(name)
        if rep is None or rep.details.get("not_servable"):
            entry["not_servable"] = rep.details["not_servable"] if rep else "no report came back"
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
    drift = comparison.details.get("drift")
    return {"run": comparison.details.get("run"), "finished_at": comparison.created_at, "mode": cfg["mode"],
            "control": control, "client_processes": cfg.get("client_processes", 1), "slo": slo_text(cfg["slo"]),
            "steps": len(comparison.details.get("order", [])),
            "first_round": [o["variant"] for o in comparison.details.get("order", [])][:max(len(names), 1)],
            "drift": drift["verdict"] if drift else None, "drifted": drift.get("drifted") if drift else None,
            "comparison": comparison_verdict(drift), "configurations": configs}


def loadtest_markdown(lt: dict) -> list[str]:
    search = ("a knee search per configuration for the highest offered rate that meets the SLO"
              if lt["mode"] == "knee" else "a sweep of offered rates")
    lines = [f"## Load test: {len(lt['configurations'])} configurations compared interleaved, control "
             f"`{lt['control']}`", "",
             f"{search}: {lt['slo']}. {lt['client_processes']} client process(es); {lt['steps']} steps in "
             f"the order {' '.join(lt['first_round'])} ... (run {lt['run']}).", "",
             f"**Drift control**: {lt['drift'] or 'not measured'}", "",
             f"**Comparison**: {lt['comparison']}", "",
             "| configuration | server (over plan.yaml's `server`) | sustained req/s [passed, failed) "
             "| against the control | search |", "|---|---|---|---|---|"]
    for c in lt["configurations"]:
        server = ", ".join(f"{k}={v}" for k, v in c["server"].items()) or "plan defaults"
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


def phase_crosscheck(plan, params) -> dict:
    from workbench.serve import VLLMServer

    cc = plan["crosscheck"]
    srv = server_cfg(plan, params, cc.get("server", {}))
    out = {}
    with VLLMServer(srv, log_path=Path("runs/logs/vllm-crosscheck.log")) as server:
        for rate in cc["rates"]:
            dest = Path(f"runs/benchmarks/gpu_crosscheck_rate{rate:g}.json")
            cmd = [sys.executable, "benchmarks/loadgen_crosscheck.py", "--base-url", server.root_url,
                   "--model", srv.model_name, "--tokenizer", plan["model_dir"], "--rate", str(rate),
                   "--arrival", "poisson", "--requests", str(cc["requests"]), "--input-tokens", "256",
                   "--output-tokens", "128", "--timeout", "300", "--out", str(dest)]
            log.info("crosscheck at %s req/s: %s", rate, " ".join(cmd))
            subprocess.run(cmd, check=True)
            out[f"rate_{rate:g}"] = json.loads(dest.read_text())
    Path("reports/gpu").mkdir(parents=True, exist_ok=True)
    Path("reports/gpu/crosscheck.json").write_text(json.dumps(out, indent=2))
    return out


def phase_shard(plan, params) -> dict:
    tp = plan["shard"]["tensor_parallel_size"]
    srv = server_cfg(plan, params, {"gpu_memory_utilization": 0.3})
    cfg = params.shard.model_copy(update={"variant": variants.BASE, "tensor_parallel_size": tp, "server": srv,
                                          "source_dir": plan["model_dir"],
                                          "out_dir": variants.sharded_dir(variants.BASE, tp)})
    report = STAGES["shard"].run(cfg)
    return {"tp": tp, **{k: v for k, v in report.metrics.items()},
            "answer": report.details["reload"].get("answer")}


def phase_evaluate(plan, params) -> dict:
    out = {}
    for backend in plan["evaluate"]["backends"]:
        cfg = params.evaluate.model_copy(update={"backend": backend, "model_dir": plan["model_dir"],
                                                 "variant": f"gpu-{backend}", "baseline": None})
        report = STAGES["evaluate"].run(cfg)
        out[backend] = {k: report.metrics.get(k) for k in ("mmlu_acc", "ceval_acc", "ppl_word", "eval_s")}
        out[backend]["timings"] = report.details["timings"]
    return out


def pack(out_dir: Path, summary: dict) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (STATE / "summary.md").write_text(markdown(summary))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md"):
        (out_dir / name).write_bytes((STATE / name).read_bytes())
    with tarfile.open(out_dir / "gpu-results.tar.gz", "w:gz") as tar:
        for folder in ("reports", "runs/loadtest", "runs/benchmarks", "runs/logs", "runs/gpu"):
            for f in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
                if f.resolve().is_relative_to(out_dir.resolve()):  # the archive itself (runs/gpu/out)
                    continue
                if f.is_file() and not f.name.startswith("step-") and f.stat().st_size < 4 << 20:
                    tar.add(f)


def markdown(summary: dict) -> str:
    lines = [f"# GPU run: {summary.get('gpu', '?')}, vLLM {summary.get('vllm', '?')}", ""]
    if summary.get("loadtest"):
        lines += loadtest_markdown(summary["loadtest"])
    for k in ("crosscheck", "shard", "evaluate", "host", "errors"):
        if k in summary:
            lines += [f"## {k}", "", "```", json.dumps(summary[k], indent=1, default=str), "```", ""]
    return "\n".join(lines)


def device_info() -> dict:
    import torch
    import vllm

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "vllm": vllm.__version__,
            "torch": torch.__version__, "cpus": os.cpu_count()}


def run_phases(plan: dict, params, wanted: list[str], out_dir: Path, summary: dict, forced: bool = False) -> dict:
    """Run the ``wanted`` phases in plan order, packing the results after each one."""
    for name in PHASES:
        if name not in wanted:
            continue
        if name == "prepare" and Path(plan["model_dir"], "config.json").exists() and not forced:
            continue
        t0 = time.perf_counter()
        log.info("=== phase %s", name)
        host = {"before": host_state()}
        log.info("host before %s: %s", name, json.dumps(host["before"]))
        try:
            if name == "prepare":
                phase_prepare(plan, params)
            elif name == "shard":
                tp = plan["shard"]["tensor_parallel_size"]
                summary["shard"] = (phase_shard(plan, params) if summary.get("gpus", 0) >= tp
                                    else {"skipped": f"{summary.get('gpus', 0)} GPU(s) < TP {tp}"})
            else:
                summary[name] = {"loadtest": phase_loadtest, "crosscheck": phase_crosscheck,
                                 "evaluate": phase_evaluate}[name](plan, params)
            summary.get("errors", {}).pop(name, None)  # an earlier failure of this phase is history
        except Exception as err:  # one phase failing must not cost the others' results
            log.error("phase %s failed: %s", name, err)
            summary.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
        summary.setdefault("phase_s", {})[name] = round(time.perf_counter() - t0, 1)
        host["after"] = host_state()
        summary.setdefault("host", {})[name] = host
        pack(out_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    p.add_argument("--only", nargs="*", choices=PHASES, help="run only these phases")
    a = p.parse_args(argv)
    out_dir = Path(a.out).resolve()  # as given from the caller's directory ...
    os.chdir(ROOT)  # ... then params.yaml, plan paths, reports/ and runs/ are the checkout's
    logconfig.setup()
    plan = yaml.safe_load(PLAN.read_text())
    params = load_params("params.yaml")
    summary_path = STATE / "summary.json"  # survives between device calls; $OUT does not
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(device_info())
    run_phases(plan, params, a.only or list(PHASES), out_dir, summary, forced=a.only is not None)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
