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
import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workbench import stats
from workbench.config import LoadtestConfig, deep_merge
from workbench.loadgen import summary, workloads
from workbench.loadgen.client import Record, Target, make_session, step_label
from workbench.loadgen.knee import KneeResult, KneeSearch
from workbench.loadgen.runner import Arm, StepResult, measure_step, run_async
from workbench.loadgen.summary import RateSummary, StepSummary
from workbench.reports import Report, sha256_file, write_report

log = logging.getLogger(__name__)
STAGE = "loadtest"
VARIANT = "all"  # a compared run's own report (order, drift check); each variant has its own too
GATEWAY_SUFFIX = "@gateway"  # loadtest.gateway_arms: "<variant>@gateway", the variant's server through the gateway


def gateway_arm(variant: str) -> str:
    """The name of ``variant``'s gateway arm (its report: reports/loadtest/<variant>@gateway.json)."""
    return variant + GATEWAY_SUFFIX


def _target(cfg: LoadtestConfig, base_url: str) -> Target:
    return Target(base_url=base_url, model=cfg.model or cfg.server.model_name,
                  endpoint=cfg.endpoint, stream=cfg.stream,
                  api_key=cfg.api_key or cfg.server.api_key, ignore_eos=cfg.workload.ignore_eos)


def server_config(cfg: LoadtestConfig, variant: str):
    """The managed server for ``variant``: its folder models/<variant> (or ``model_dir``), with
    ``server_overrides[variant]`` applied (a configuration compared under its own name)."""
    over = cfg.server_overrides.get(variant, {})
    merged = {**cfg.server.model_dump(), "model_dir": cfg.model_dir or f"models/{variant}", **over}
    return type(cfg.server).model_validate(merged)


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
def gateway_in_front(cfg: LoadtestConfig, upstream_url: str, model: str, log_dir: Path,
                     upstream_key: str | None = None):
    """The gateway as its own process in front of ``upstream_url`` (``upstream_key``: the server's
    own --api-key, sent upstream by the gateway); yields (base_url, api_key)."""
    import secrets
    import subprocess
    import sys

    import yaml

    from workbench.gateway.keys import hash_key
    from workbench.net import free_port, stop, wait_http_ok
    from workbench.serve import ServerError, tail

    key = "wb-" + secrets.token_urlsafe(24)
    gw = deep_merge(yaml.safe_load(Path(cfg.gateway_config).read_text()), cfg.gateway_overrides)
    upstream = {"base_url": upstream_url, **({"api_key": upstream_key} if upstream_key else {})}
    gw.update(upstreams={model: upstream}, keys=[{"id": "loadtest", "sha256": hash_key(key)}],
              keys_file=None)
    gw["audit"] = {**gw.get("audit", {}), "path": str(log_dir / "gateway-audit.sqlite")}
    conf = log_dir / "gateway.yaml"
    conf.write_text(yaml.safe_dump(gw))
    from workbench.gateway.config import GatewayConfigError, load_config
    try:  # a misspelled override fails here, named, not as a gateway that never came up
        load_config(conf)
    except GatewayConfigError as err:
        raise ServerError(f"the gateway config for {log_dir.name} ({cfg.gateway_config} with "
                          f"loadtest.gateway_overrides {cfg.gateway_overrides}) is not valid: {err}") from None
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
        stop(proc)


def start_endpoints(cfg: LoadtestConfig, variants: list[str], stack: contextlib.ExitStack) -> dict:
    """Each variant's endpoint entered on ``stack``: {variant: (base_url, info)}, or the
    ServerError that says why it cannot be served. One after another, or with
    ``cfg.parallel_start`` all at once (a GPU host: minutes of server starts become one); a server
    that fails to start beside the others is tried once more on its own before it is given up."""
    from workbench.serve import ServerError

    def one(v: str):
        try:
            return stack.enter_context(endpoint(cfg, v, Path(cfg.out_dir) / v))
        except ServerError as err:
            return err

    if not cfg.parallel_start or len(variants) < 2:
        return {v: one(v) for v in variants}
    import concurrent.futures

    managers = {v: endpoint(cfg, v, Path(cfg.out_dir) / v) for v in variants}
    log.info("starting %d servers at once: %s", len(variants), ", ".join(variants))
    # The pool's threads must outlive the servers they started: a managed server dies with the
    # thread that spawned it (serve._die_with_parent, PR_SET_PDEATHSIG). Entered on the stack first,
    # the pool shuts down after every server's exit (the stack unwinds last in, first out).
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(len(variants), "server-start"))
    futures = {v: pool.submit(cm.__enter__) for v, cm in managers.items()}
    concurrent.futures.wait(futures.values())
    started, unexpected = {}, None
    for v, future in futures.items():  # every server that came up is stopped with the stack
        try:
            started[v] = future.result()
            stack.push(managers[v].__exit__)
        except ServerError as err:
            started[v] = err
        except BaseException as err:  # noqa: BLE001 - raised below, once the others are on the stack
            unexpected = unexpected or err
    if unexpected is not None:
        raise unexpected
    for v in [v for v in variants if isinstance(started[v], ServerError)]:
        log.warning("%s did not start beside the others (%s); trying it alone", v,
                    str(started[v]).splitlines()[0] if str(started[v]) else type(started[v]).__name__)
        started[v] = one(v)
    return started


ALIVE_TIMEOUT_S = 30.0  # how long check_alive waits for a server's /health


def check_alive(arms: list[Arm], infos: dict[str, dict]) -> None:
    """Every managed server still answers /health before the first step: one that died after its
    start would otherwise turn the whole run into connection errors, measured and reported."""
    from workbench.net import wait_http_ok
    from workbench.serve import ServerError, tail

    for arm in arms:
        info = infos.get(arm.variant, {})
        if not info.get("managed") or not arm.root_url:
            continue
        if not wait_http_ok(f"{arm.root_url}/health", ALIVE_TIMEOUT_S):
            log_path = info.get("log")
            raise ServerError(f"{arm.variant}: the server at {arm.root_url} stopped answering before the first "
                              f"step" + (f"; its log ends:\n{tail(Path(log_path))}" if log_path else ""))


@dataclass
class Done:
    """A step measured in this run: the arm, its result, and its place in the interleaved order."""

    arm: Arm
    result: StepResult
    repeat: int
    role: str  # measure | control-start | control-end | knee
    position: int


def _stop_after(cfg: LoadtestConfig, result: StepResult) -> bool:
    g = result.metrics.get("goodput_fraction", 0.0)
    return cfg.stop_below_goodput is not None and g < cfg.stop_below_goodput


async def interleaved(cfg: LoadtestConfig, arms: list[Arm],
                      on_step: Callable[[Done], None]) -> tuple[list[Done], dict[str, KneeResult], str | None]:
    """Every arm's steps, interleaved: for each repeat, for each rate, one step of each arm in turn
    (A B C A B C), all arms at one (rate, repeat) sent the same prompts at the same offsets. In
    ``knee`` mode each arm's knee search advances one probe per round. With ``drift_control``, the
    first step is measured again, on the same requests, at the end. Past ``max_duration_s`` no new
    step starts (the drift control excepted); the third value then says so, else it is None."""
    specs = workloads.load(cfg.workload, np.random.default_rng(cfg.seed))
    done: list[Done] = []
    knees: dict[str, KneeResult] = {}
    low = low_load_config(cfg)  # knee mode's low-load step, or None
    t0 = time.monotonic()
    stopped: list[str] = []  # the time budget's note, once it ran out

    def out_of_time() -> bool:
        if not stopped and cfg.max_duration_s is not None and time.monotonic() - t0 >= cfg.max_duration_s:
            stopped.append(f"the load test's time budget (max_duration_s {cfg.max_duration_s:g} s) ran out "
                           f"after {len(done)} steps")
            log.warning("%s: no new step starts", stopped[0])
        return bool(stopped)
    async with make_session(cfg.timeout_s) as session:
        async def step(arm: Arm, rate: float, index: int, repeat: int, role: str,
                       step_cfg: LoadtestConfig = cfg) -> Done:
            label = step_label(rate) + (f"-r{repeat}" if repeat else "") + ("-control-end" if role == "control-end" else "")
            result = await measure_step(step_cfg, arm, session, specs, rate, index, repeat, label)
            d = Done(arm, result, repeat, role, len(done))
            done.append(d)
            on_step(d)
            return d

        # A drift control needs something to bracket: more than one step in the run.
        controlled = cfg.drift_control and (cfg.mode == "knee" or cfg.repeats * len(cfg.rates) * len(arms) > 1)

        def first_role() -> str:
            return "control-start" if controlled and not done else "measure"

        if cfg.mode == "sweep":
            saturated: dict[str, float] = {}
            for repeat in range(cfg.repeats):
                for index, rate in enumerate(cfg.rates):
                    for arm in arms:
                        if rate > saturated.get(arm.variant, math.inf) or out_of_time():
                            continue
                        d = await step(arm, rate, index, repeat, first_role())
                        if _stop_after(cfg, d.result):
                            log.info("%s saturated at %g req/s: its higher rates are skipped", arm.variant, rate)
                            saturated[arm.variant] = rate
        else:
            if low is not None:  # decode speed at low load, every arm, before the searches
                for arm in arms:
                    if not out_of_time():
                        await step(arm, cfg.knee.low_load_req_per_s, 0, 0, first_role(), low)
            searches = {arm.variant: KneeSearch(cfg.knee) for arm in arms}
            pooled: dict[tuple[str, float], summary.Columns] = {}
            while any(s.next_rate() is not None for s in searches.values()):
                for arm in arms:
                    search = searches[arm.variant]
                    if out_of_time():
                        search.stop(stopped[0])
                    rate = search.next_rate()
                    if rate is None:
                        continue
                    key = (arm.variant, rate)
                    repeat = sum(1 for d in done if d.arm.variant == arm.variant and d.result.rate == rate)
                    role = first_role()
                    d = await step(arm, rate, 0, repeat, role if role == "control-start" else "knee")
                    cols = summary.columns(d.result.records, cfg.slo)
                    pooled[key] = pooled[key] + cols if key in pooled else cols
                    search.observe(rate, summary.slo_verdict(pooled[key], cfg.slo).overall)
            knees = {v: s.result() for v, s in searches.items()}
        if controlled and len(done) > 1:
            first = done[0]  # measured again with its own step size (the low-load step's, when it came first)
            await step(first.arm, first.result.rate, cfg.rates.index(first.result.rate)
                       if cfg.mode == "sweep" else 0, first.repeat, "control-end", low or cfg)
    return done, knees, (stopped[0] if stopped else None)


def low_load_config(cfg: LoadtestConfig) -> LoadtestConfig | None:
    """Knee mode's low-load step (``knee.low_load_req_per_s``): ``low_load_requests`` measured
    requests, whatever size the probes have; None when not asked for."""
    if cfg.mode != "knee" or cfg.knee.low_load_req_per_s is None:
        return None
    return cfg.model_copy(update={"requests_per_step": cfg.knee.low_load_requests, "duration_s": None})


def write_records(result: StepResult, out_dir: Path) -> Path:
    path = out_dir / f"step-{result.label.removeprefix('rate_')}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for rec in result.records:
            f.write(json.dumps(rec.to_dict()) + "\n")
    return path


def read_records(path: str | Path) -> list[Record]:
    """A step's raw records back from its JSONL file (the report stage compares variants on them)."""
    return [Record(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


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
        p = step_label(r.offered_req_per_s)
        for name in ("achieved_req_per_s", "request_throughput_req_per_s", "output_tokens_per_s", "goodput"):
            put(f"{p}.{name}", getattr(r, name))
        for lat, dist in r.latency.items():
            for pct, est in dist.p.items():
                put(f"{p}.{lat}_ms_{pct}", est)
        out[f"{p}.requests"] = float(r.requests)
        out[f"{p}.slo_pass"] = {"pass": 1.0, "fail": 0.0}.get(r.slo.overall.value, 0.5)
    passed = [r.offered_req_per_s for r in rates if r.slo.overall is stats.Verdict.passed]
    not_failed = [r.offered_req_per_s for r in rates if r.slo.overall is not stats.Verdict.failed]
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
            "variant": r.variant, "offered req/s": f"{r.offered_req_per_s:g}",
            "requests": f"{r.requests} ({r.repeats} rep.)",
            "achieved req/s": r.achieved_req_per_s.text(".3g"),
            "TTFT p50 ms": lat["ttft"].at(50).text(".0f"), "TTFT p99 ms": lat["ttft"].at(99).text(".0f"),
            "E2EL mean ms": f"{lat['e2el'].mean_ms:.0f}" if lat["e2el"].mean_ms is not None else "n/a",
            "E2EL p99 ms": lat["e2el"].at(99).text(".0f"), "TPOT p50 ms": lat["tpot"].at(50).text(".1f"),
            "output tok/s": r.output_tokens_per_s.text(".3g"),
            "goodput": r.goodput.text(".2f"), "SLO": r.slo.overall.value, "errors": r.errors,
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


def not_servable(cfg: LoadtestConfig, variant: str, err: Exception) -> Report:
    """The report of a variant whose managed vLLM did not come up on this machine (e.g. vLLM-CPU's
    4-bit kernel needs AVX-512): no steps, the server's own reason, and a logged error."""
    msg = f"variant '{variant}' could not be served by vLLM on this machine; not load-tested"
    log.error("%s:\n%s", msg, str(err)[-2000:])
    report = Report(stage=STAGE, variant=variant, config=cfg.model_dump(mode="json"), metrics={},
                    details={"not_servable": msg, "server": {"managed": True, "error": str(err)[-4000:]},
                             "steps": [], "rates": [], "table": []})
    write_report(report)
    return report


def _variant_report(cfg: LoadtestConfig, variant: str, done: list[Done], knee: KneeResult | None,
                    server_info: dict, outputs: dict[str, str], fingerprint: dict, run_id: str,
                    stopped: str | None = None) -> Report:
    mine = [d for d in done if d.arm.variant == variant]
    cols = {d.position: summary.columns(d.result.records, cfg.slo) for d in mine}
    steps = [summary.step_summary(
        variant, d.result.label, d.result.rate, d.result.records, cfg.slo, d.result.metrics,
        cols=cols[d.position], repeat=d.repeat, position=d.position, role=d.role, started_unix=d.result.started_unix,
        limited_by=d.result.limited_by, records_file=outputs.get(f"records_{d.result.label}")) for d in mine]
    rates = summary.rate_summaries(steps, cols, cfg.slo)
    report = Report(
        stage=STAGE, variant=variant, config=cfg.model_dump(mode="json"), data_fingerprint=fingerprint,
        metrics=flat_metrics(rates, knee),
        details={"server": server_info, "run": run_id,
                 "steps": [s.model_dump(mode="json") for s in steps],
                 "rates": [r.model_dump(mode="json") for r in rates],
                 "knee": knee.model_dump(mode="json") if knee else None,
                 "step_metrics": {d.result.label: d.result.metrics for d in mine},
                 "time_budget_stopped": stopped},
        outputs=dict(outputs))
    write_report(report)  # the result; everything below is a view of it
    out_dir = Path(cfg.out_dir) / variant
    rows = table_rows(rates)
    (out_dir / "summary.md").write_text(markdown(rows), encoding="utf-8")
    report.outputs["summary_md"] = str(out_dir / "summary.md")
    ttft_ms: dict[str, list[float]] = {}  # per offered rate, its repeats pooled; the drift control apart
    for d, s in zip(mine, steps):
        if s.role != "control-end":
            ttft_ms.setdefault(f"{s.offered_req_per_s:g} req/s", []).extend(cols[d.position].ttft_ms.tolist())
    try:
        from workbench import plots

        report.outputs.update(plots.latency(rates, ttft_ms, out_dir))
    except Exception as err:  # a plot is a view; the report stands without it
        log.warning("load-test plots failed (%s: %s)", type(err).__name__, err)
    write_report(report)
    met = f"sustained rate at the SLO {knee.text()}" if knee is not None else \
        f"SLO met (supported) up to {report.metrics['slo_rate_req_per_s']:.2f} req/s"
    log.info("loadtest %s: %d steps, %s -> %s", variant, len(steps), met, report.path)
    return report


def steps_of(report: Report) -> list[StepSummary]:
    return [StepSummary.model_validate(s) for s in report.details.get("steps", [])]


def rates_of(report: Report) -> list[RateSummary]:
    return [RateSummary.model_validate(r) for r in report.details.get("rates", [])]


def run(cfg: LoadtestConfig, variant: str | None = None) -> Report:
    """Load-test ``variant``, or, with None, compare ``cfg.variants`` interleaved (a report per
    variant, and ``reports/loadtest/all.json`` with the run's order and its drift check).
    ``variant`` is ``cfg.variant`` given here: the report's config records it. Each variant in
    ``cfg.gateway_arms`` gets a second arm on its server, ``<variant>@gateway``, through the gateway:
    an arm like any other (its own report and records), compared with the direct one in all.json
    (``details.gateway``; written then even for one ``variant``, whose report is returned)."""
    if variant:
        cfg = cfg.model_copy(update={"variant": variant})
    variant = cfg.variant
    if not variant and cfg.variants is None:
        raise ValueError("loadtest.variants is null: list the variants to compare, or read the config "
                         "through params.yaml (null there = base and every quantize.variants entry with serve: true)")
    variants = [variant] if variant else list(dict.fromkeys(cfg.variants))
    if cfg.base_url and len(variants) > 1:
        raise ValueError(f"loadtest.base_url names one endpoint; compare {variants} with managed servers "
                         "(base_url: null) or load-test one variant at a time")
    via = list(dict.fromkeys(cfg.gateway_arms))
    unknown = [g for g in via if g not in variants]
    if unknown:
        raise ValueError(f"loadtest.gateway_arms names {', '.join(map(repr, unknown))}, not among the variants "
                         f"of this run {variants}: a gateway arm shares its variant's server")
    if via and cfg.via_gateway:
        raise ValueError("loadtest.via_gateway puts the gateway in front of every arm, gateway_arms adds a "
                         "gateway arm beside a direct one: set one of them")
    names = [n for v in variants for n in ([v, gateway_arm(v)] if v in via else [v])]  # the arms' order
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    outputs: dict[str, dict[str, str]] = {v: {} for v in names}
    for v in names:
        d = Path(cfg.out_dir) / v
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("step-*.jsonl"):  # a previous run's steps must not linger beside ours
            stale.unlink()

    def on_step(d: Done) -> None:  # raw records reach disk as each step ends
        path = write_records(d.result, Path(cfg.out_dir) / d.arm.variant)
        outputs[d.arm.variant][f"records_{d.result.label}"] = str(path)

    from workbench.serve import ServerError

    infos: dict[str, dict] = {}
    unservable: dict[str, Report] = {}
    with contextlib.ExitStack() as stack:
        arms = []
        started = start_endpoints(cfg, variants, stack)  # the servers stay up together
        for v in variants:
            if isinstance(started[v], ServerError):  # the variant cannot be served here: say so, measure the rest
                unservable[v] = not_servable(cfg, v, started[v])
                if v in via:
                    unservable[gateway_arm(v)] = not_servable(cfg, gateway_arm(v), started[v])
                continue
            base_url, info = started[v]
            root_url = base_url.removesuffix("/v1")  # vLLM's own /metrics, also behind a gateway
            target = _target(cfg, base_url)
            if cfg.via_gateway:
                gw_url, key = stack.enter_context(gateway_in_front(cfg, base_url, target.model, Path(cfg.out_dir) / v))
                target = dataclasses.replace(target, base_url=gw_url, api_key=key)
                info = {**info, "via_gateway": gw_url}
            infos[v] = info
            arms.append(Arm(v, target, root_url, info.get("pid")))
            if v in via:  # a second arm on the same server, through its own gateway
                name = gateway_arm(v)
                gw_url, key = stack.enter_context(gateway_in_front(cfg, base_url, target.model,
                                                                   Path(cfg.out_dir) / name, target.api_key))
                infos[name] = {**info, "via_gateway": gw_url, "direct_arm": v}
                arms.append(Arm(name, dataclasses.replace(target, base_url=gw_url, api_key=key), root_url,
                                info.get("pid")))
        check_alive(arms, infos)
        done, knees, stopped = run_async(interleaved(cfg, arms, on_step)) if arms else ([], {}, None)

    fingerprint = {}
    if cfg.workload.path and Path(cfg.workload.path).is_file():
        fingerprint["workload"] = {"path": cfg.workload.path, "sha256": sha256_file(Path(cfg.workload.path))}
    reports = {v: _variant_report(cfg, v, done, knees.get(v), infos[v], outputs[v], fingerprint, run_id, stopped)
               for v in names if v in infos}
    reports.update(unservable)
    if variant and not via:
        return reports[variant]

    control = [d for d in done if d.role in ("control-start", "control-end")]
    drift = None
    if len(control) == 2:
        start = steps_of(reports[control[0].arm.variant])[0]
        drift = summary.drift_check(start, *(summary.columns(d.result.records, cfg.slo) for d in control),
                                    tolerance=cfg.drift_tolerance)
        log.info("%s", drift.verdict)
    gateway = {gateway_arm(v): gateway_comparison(cfg, v, done, knees, infos) for v in via if v in infos}
    gateway_metrics = {}
    for g in gateway.values():
        est = stats.Estimate.model_validate(g["sustained_ratio"]) if g["sustained_ratio"] else None
        if est is not None and est.value is not None:
            key = f"{g['variant']}.gateway_sustained_ratio"  # no '@': MLflow metric names
            gateway_metrics[key] = est.value
            gateway_metrics.update({f"{key}_ci_{side}": getattr(est, side) for side in ("lo", "hi")
                                    if getattr(est, side) is not None})
    report = Report(
        stage=STAGE, variant=VARIANT, config=cfg.model_dump(mode="json"), data_fingerprint=fingerprint,
        metrics={**({"drift_ttft_ratio": drift.ttft.diff.value, "drift_detected": float(drift.drifted)}
                    if drift and drift.ttft.diff.value is not None else {}), **gateway_metrics},
        details={"run": run_id, "variants": variants, "arms": names, "not_servable": sorted(unservable),
                 "order": [{"position": d.position, "variant": d.arm.variant, "label": d.result.label,
                            "repeat": d.repeat, "role": d.role} for d in done],
                 "drift": drift.model_dump(mode="json") if drift else None,
                 "gateway": gateway,
                 "time_budget": {"max_duration_s": cfg.max_duration_s, "stopped": stopped},
                 "reports": {v: str(r.path) for v, r in reports.items()}})
    write_report(report)
    return reports[variant] if variant else report


def gateway_comparison(cfg: LoadtestConfig, variant: str, done: list[Done], knees: dict[str, KneeResult],
                       infos: dict[str, dict]) -> dict:
    """``variant``'s gateway arm against its direct arm, both on one server and the same requests:
    the ratio of their sustained rates (knee mode; its interval from the two knees' brackets), and
    at every offered rate both measured, TTFT and E2EL gateway/direct (``stats.compare_samples``:
    ratio of medians, Mann-Whitney U) beside each arm's SLO verdict. The drift control's repeat is
    left out, as in the per-rate tables."""
    name = gateway_arm(variant)
    direct, gw = knees.get(variant), knees.get(name)
    ratio = None
    if direct is not None and gw is not None and direct.lo and gw.lo is not None:
        ratio = stats.Estimate(
            value=gw.lo / direct.lo, lo=gw.lo / direct.hi if direct.hi else None,
            hi=gw.hi / direct.lo if gw.hi is not None else None, n=len(gw.probes) + len(direct.probes),
            method="ratio of sustained rates",
            note="value: the highest rates shown to meet the SLO, gateway / direct; interval: from the two "
                 "knees' brackets [lo, hi), not a confidence level")

    def pooled(arm: str) -> dict[float, summary.Columns]:
        out: dict[float, summary.Columns] = {}
        for d in done:
            if d.arm.variant == arm and d.role != "control-end":
                cols = summary.columns(d.result.records, cfg.slo)
                out[d.result.rate] = out[d.result.rate] + cols if d.result.rate in out else cols
        return out

    a, b = pooled(name), pooled(variant)
    per_rate = []
    for rate in sorted(set(a) & set(b)):
        per_rate.append({
            "offered_req_per_s": rate,
            "ttft_gateway_over_direct": stats.compare_samples(a[rate].ttft_ms, b[rate].ttft_ms).model_dump(mode="json"),
            "e2el_gateway_over_direct": stats.compare_samples(a[rate].e2el_ms, b[rate].e2el_ms).model_dump(mode="json"),
            "slo_direct": summary.slo_verdict(b[rate], cfg.slo).overall.value,
            "slo_gateway": summary.slo_verdict(a[rate], cfg.slo).overall.value})
    return {"variant": variant, "direct_arm": variant, "gateway_arm": name,
            "gateway_url": infos.get(name, {}).get("via_gateway"),
            "sustained_req_per_s": {"direct": direct.lo if direct else None, "gateway": gw.lo if gw else None},
            "sustained_ratio": ratio.model_dump(mode="json") if ratio else None,
            "per_rate": per_rate}


def track(parent, report: Report) -> None:
    """Tables and plots as artifacts of the stage's run (``tracking.StageRun``), and one nested
    MLflow run per step (with its intervals as ``_ci_lo``/``_ci_hi`` metrics). A compared run's
    report (``all``) tracks each variant's report in turn."""
    from workbench import tracking
    from workbench.reports import read_report

    variant_reports = ([read_report(Path(p)) for p in report.details.get("reports", {}).values()]
                       if report.variant == VARIANT else [report])
    for vr in variant_reports:
        for key in ("summary_md", "latency_vs_rate", "ttft_cdf"):
            if key in vr.outputs and Path(vr.outputs[key]).exists():
                parent.log_artifact(Path(vr.outputs[key]), f"loadtest/{vr.variant}")
        for step in steps_of(vr):
            tracking.log_child_run(parent, f"{STAGE}:{vr.variant}:{step.label}",
                                   {"offered_req_per_s": step.offered_req_per_s, "variant": vr.variant,
                                    "repeat": step.repeat, "role": step.role, "position": step.position},
                                   vr.details.get("step_metrics", {}).get(step.label, {}))


def table(report: Report):
    """The per-rate table (every figure with its interval) for notebooks."""
    import pandas as pd

    if report.variant == VARIANT:
        from workbench.reports import read_report

        rates = [r for p in report.details.get("reports", {}).values() for r in rates_of(read_report(Path(p)))]
    else:
        rates = rates_of(report)
    return pd.DataFrame(table_rows(rates))
