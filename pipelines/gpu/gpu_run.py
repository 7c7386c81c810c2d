"""The GPU run, on the device machine: prepare, load-test sweeps before/after, cross-check, shard, evaluate.

    python3 pipelines/gpu/gpu_run.py --out $OUT                      # every phase of plan.yaml
    python3 pipelines/gpu/gpu_run.py --out $OUT --only gpu-before crosscheck

Runs the workbench's own stages (workbench.prepare / loadtest / shard / evaluate ``run(cfg)``) with
CUDA vLLM, from plan.yaml over params.yaml, in this checkout. Reports land in reports/ as on any
machine; after every phase the reports, load tables, plots and server-log tails are packed into
``<out>/gpu-results.tar.gz`` (so a run cut short still returns what it finished), and
``<out>/summary.md`` gets the seed-style table. pipelines/gpu/README.md has the whole procedure;
``python -m pipelines.gpu.import_results`` logs the returned reports to MLflow on your machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from workbench import loadtest  # noqa: E402
from workbench.config import LoadtestConfig, ServerConfig, load_params  # noqa: E402
from workbench.reports import read_report, report_path  # noqa: E402

log = logging.getLogger("gpu_run")
PLAN = Path(__file__).with_name("plan.yaml")
STATE = Path("runs/gpu")
TTFT_P99_MS, GOODPUT = 300.0, 0.99  # the bar for "the rate it sustains"


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def server_cfg(plan: dict, params, over: dict) -> ServerConfig:
    merged = deep_merge(deep_merge(params.serve.chat.model_dump(), plan["common"]["server"]), over)
    return ServerConfig.model_validate({**merged, "model_dir": plan["model_dir"]})


def loadtest_cfg(plan: dict, params, run: dict) -> LoadtestConfig:
    lt = params.loadtest.model_dump()
    lt = deep_merge(lt, plan["common"]["loadtest"])
    lt = deep_merge(lt, run.get("loadtest", {}))
    lt["server"] = server_cfg(plan, params, run.get("server", {})).model_dump()
    lt["model_dir"] = plan["model_dir"]
    lt["out_dir"] = "runs/loadtest"
    return LoadtestConfig.model_validate(lt)


def sustained_rate(report) -> float:
    """Highest offered rate whose step kept TTFT p99 <= 300 ms and goodput >= 99%, no errors."""
    ok = [s["offered_req_per_s"] for s in report.details["steps"]
          if s["metrics"].get("ttft_ms_p99", math.inf) <= TTFT_P99_MS
          and s["metrics"].get("goodput_fraction", 0) >= GOODPUT and not s["errors"]]
    return max(ok, default=0.0)


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
    from workbench import prepare

    cfg = params.prepare.model_copy(update={"out_dir": plan["model_dir"], "embedding": None})
    prepare.run(cfg)


def phase_loadtest(plan, params, run: dict) -> dict:
    cfg = loadtest_cfg(plan, params, run)
    return summarize(loadtest.run(cfg, variant=run["name"]), run.get("server", {}))


def summarize(report, server_over: dict) -> dict:
    """One load-test report as a row group of the GPU summary."""
    return {"name": report.variant, "sustained_req_per_s": sustained_rate(report),
            "server": dict(server_over), "client_processes": report.config.get("client_processes", 1),
            "finished_at": report.created_at,
            "steps": [{"offered": s["offered_req_per_s"], "limited_by": s.get("limited_by"),
                       **{k: s["metrics"].get(k) for k in (
                           "achieved_req_per_s", "request_throughput_req_per_s", "ttft_ms_p50",
                           "ttft_ms_p99", "tpot_ms_p50", "e2el_ms_mean", "e2el_ms_p99", "goodput_fraction",
                           "output_tokens_per_s", "gpu_util_pct_mean", "send_lag_ms_p99",
                           "cpu_busiest_pct_api_server", "cpu_busiest_pct_engine_core",
                           "cpu_busiest_pct_client")}} for s in report.details["steps"]]}


def phase_crosscheck(plan, params) -> dict:
    from workbench.serve import VLLMServer

    cc = plan["crosscheck"]
    srv = server_cfg(plan, params, cc.get("server", {}))
    out = {}
    with VLLMServer(srv, log_path=Path("runs/logs/vllm-crosscheck.log")) as server:
        for rate in cc["rates"]:
            dest = Path(f"runs/benchmarks/gpu_crosscheck_rate{rate:g}.json")
            cmd = [sys.executable, "benchmarks/loadgen_crosscheck.py", "--base-url", server.root_url,
                   "--model", srv.served_name, "--tokenizer", plan["model_dir"], "--rate", str(rate),
                   "--arrival", "poisson", "--requests", str(cc["requests"]), "--input-tokens", "256",
                   "--output-tokens", "128", "--timeout", "300", "--out", str(dest)]
            log.info("crosscheck at %s req/s: %s", rate, " ".join(cmd))
            subprocess.run(cmd, check=True)
            out[f"rate_{rate:g}"] = json.loads(dest.read_text())
    Path("reports/gpu").mkdir(parents=True, exist_ok=True)
    Path("reports/gpu/crosscheck.json").write_text(json.dumps(out, indent=2))
    return out


def phase_shard(plan, params) -> dict:
    from workbench import shard

    tp = plan["shard"]["tensor_parallel_size"]
    srv = server_cfg(plan, params, {"gpu_memory_utilization": 0.3})
    cfg = params.shard.model_copy(update={"tensor_parallel_size": tp, "source_dir": plan["model_dir"],
                                          "out_dir": f"models/base-tp{tp}", "server": srv})
    report = shard.run(cfg, variant="base")
    return {"tp": tp, **{k: v for k, v in report.metrics.items()},
            "answer": report.details["reload"].get("answer")}


def phase_evaluate(plan, params) -> dict:
    from workbench import evaluate

    out = {}
    for backend in plan["evaluate"]["backends"]:
        cfg = params.evaluate.model_copy(update={"backend": backend, "model_dir": plan["model_dir"],
                                                 "variant": f"gpu-{backend}", "baseline": None})
        report = evaluate.run(cfg)
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
                if f.is_file() and not f.name.startswith("step-") and f.stat().st_size < 4 << 20:
                    tar.add(f)


def markdown(summary: dict) -> str:
    lines = [f"# GPU run: {summary.get('gpu', '?')}, vLLM {summary.get('vllm', '?')}", ""]
    for run in summary.get("loadtest", []):
        lines += [f"## {run['name']} (server {run['server'] or 'vLLM defaults'}, "
                  f"{run['client_processes']} client process(es)): sustained "
                  f"{run['sustained_req_per_s']:g} req/s at TTFT p99 <= 300 ms, goodput >= 99%", "",
                  "| offered | achieved | TTFT p50 | TTFT p99 | TPOT p50 | E2EL mean | E2EL p99 | goodput "
                  "| out tok/s | GPU util % | API-server CPU % | engine CPU % | client CPU % | limited by |",
                  "|" + "---|" * 14]
        for s in run["steps"]:
            def f(k, fmt="{:.0f}"):
                v = s.get(k)
                return "" if v is None else fmt.format(v)
            lines.append(f"| {s['offered']:g} | {f('achieved_req_per_s', '{:.1f}')} | {f('ttft_ms_p50')} | "
                         f"{f('ttft_ms_p99')} | {f('tpot_ms_p50', '{:.1f}')} | {f('e2el_ms_mean')} | "
                         f"{f('e2el_ms_p99')} | {f('goodput_fraction', '{:.3f}')} | {f('output_tokens_per_s')} | "
                         f"{f('gpu_util_pct_mean')} | {f('cpu_busiest_pct_api_server')} | "
                         f"{f('cpu_busiest_pct_engine_core')} | {f('cpu_busiest_pct_client')} | {s['limited_by']} |")
        lines.append("")
    for k in ("crosscheck", "shard", "evaluate", "host", "errors"):
        if k in summary:
            lines += [f"## {k}", "", "```", json.dumps(summary[k], indent=1, default=str), "```", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    p.add_argument("--only", nargs="*", help="phase names (prepare, a run's name, crosscheck, shard, evaluate)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = yaml.safe_load(PLAN.read_text())
    params = load_params("params.yaml")
    import torch
    import vllm

    out_dir = Path(a.out)
    summary_path = STATE / "summary.json"  # survives between device calls; $OUT does not
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   vllm=vllm.__version__, torch=torch.__version__, cpus=os.cpu_count())
    phases = ["prepare", *[r["name"] for r in plan["runs"]], "crosscheck", "shard", "evaluate"]
    wanted = a.only or phases
    runs = {r["name"]: r for r in plan["runs"]}
    for name in phases:
        if name not in wanted:
            continue
        if name == "prepare" and Path(plan["model_dir"], "config.json").exists() and a.only is None:
            continue
        t0 = time.perf_counter()
        log.info("=== phase %s", name)
        host = {"before": host_state()}
        log.info("host before %s: %s", name, json.dumps(host["before"]))
        try:
            if name == "prepare":
                phase_prepare(plan, params)
            elif name in runs:
                res = phase_loadtest(plan, params, runs[name])
                summary["loadtest"] = [r for r in summary.get("loadtest", []) if r["name"] != name] + [res]
            elif name == "shard":
                if torch.cuda.device_count() < plan["shard"]["tensor_parallel_size"]:
                    summary["shard"] = {"skipped": f"{torch.cuda.device_count()} GPU(s) < TP"}
                else:
                    summary["shard"] = phase_shard(plan, params)
            else:
                summary[name] = {"crosscheck": phase_crosscheck, "evaluate": phase_evaluate}[name](plan, params)
            summary.get("errors", {}).pop(name, None)  # an earlier failure of this phase is history
        except Exception as err:  # one phase failing must not cost the others' results
            log.error("phase %s failed: %s", name, err)
            summary.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
        summary.setdefault("phase_s", {})[name] = round(time.perf_counter() - t0, 1)
        host["after"] = host_state()
        summary.setdefault("host", {})[name] = host
        pack(out_dir, summary)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
