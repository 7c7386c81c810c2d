"""The one executor: runs a plan (plan.py) over arms (arms.py), step by step, for the DVC stage,
the notebook and the CLI (``python -m workbench.loadgen``) alike.

    python -c "from workbench import loadtest; from workbench.config import load_params; \
               loadtest.run(load_params().loadtest)"

``run(cfg)`` checks the config, brings every arm up (arms.open_arms), asks the plan for blocks and
measures each step in order (step.measure_step), writes each step's raw records as it ends, tells
the plan what it measured (the SLO verdict pooled over the point's repeats so far, and whether the
step reached steady state), and stops starting steps when ``max_duration_s`` runs out. Then every
arm's report and the run's own ``all.json`` (report.py, compare.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workbench import stats
from workbench.config import LoadtestConfig
from workbench.loadgen import summary, workloads
from workbench.loadgen.client import make_session, run_async
from workbench.loadtest import arms as arms_mod
from workbench.loadtest import compare, report as rep, step as step_mod
from workbench.loadtest.arms import Arm
from workbench.loadtest.plan import Outcome, Plan, StepSpec, make_plan
from workbench.loadtest.step import StepResult
from workbench.reports import Report

log = logging.getLogger(__name__)


@dataclass
class Done:
    """A step measured in this run: the arm, its result, the plan's spec, its place in the run."""

    arm: Arm
    result: StepResult
    spec: StepSpec
    position: int

    @property
    def repeat(self) -> int:
        return self.spec.repeat

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def block(self) -> int:
        return self.spec.block


def low_load_config(cfg: LoadtestConfig) -> LoadtestConfig:
    """Knee mode's low-load step (``knee.low_load_req_per_s``): ``low_load_requests`` measured
    requests, whatever size the probes have."""
    return cfg.model_copy(update={"requests_per_step": cfg.knee.low_load_requests, "duration_s": None})


def outcome(cfg: LoadtestConfig, result: StepResult, pooled: summary.Columns) -> Outcome:
    """What the plan learns from a step: the SLO verdict over the point's requests so far, whether
    this step reached steady state, its goodput."""
    steady = True if result.steady_state is None else result.steady_reached  # None: not judged (no detector)
    # A knee probe is judged again on its pooled requests while undecided (up to max_repeats
    # looks): each look at a wider interval, so that a p99 at the limit passes <= 5 % (issue 28).
    level = summary.look_level(cfg.knee.max_repeats) if cfg.mode == "knee" else stats.LEVEL
    return Outcome(verdict=summary.slo_verdict(pooled, cfg.slo, level=level).overall, steady=steady,
                   goodput_fraction=result.metrics.get("goodput_fraction", 0.0))


async def execute(cfg: LoadtestConfig, plan: Plan, arms: list[Arm],
                  on_step: Callable[[Done], None]) -> tuple[list[Done], str | None]:
    """Every block of ``plan`` over ``arms``, step by step; (steps measured, the time budget's note
    when it stopped the run, else None). Past ``max_duration_s`` no new step starts."""
    specs = workloads.load(cfg.workload, np.random.default_rng(cfg.seed))
    by_name = {a.variant: a for a in arms}
    done: list[Done] = []
    pooled: dict[tuple, summary.Columns] = {}
    last_p50: dict[str, float] = {}  # each arm's E2E p50 (s) in its last step
    t0 = time.monotonic()
    stopped: str | None = None
    async with make_session(cfg.timeout_s) as session:
        while (block := plan.next_block()) is not None:
            for spec in block:
                if cfg.max_duration_s is not None and time.monotonic() - t0 >= cfg.max_duration_s:
                    stopped = (f"the load test's time budget (max_duration_s {cfg.max_duration_s:g} s) ran out "
                               f"after {len(done)} steps")
                    log.warning("%s: no new step starts", stopped)
                    plan.stop(stopped)
                    break
                step_cfg = low_load_config(cfg) if spec.role == "low-load" else cfg
                result = await step_mod.measure_step(step_cfg, by_name[spec.arm], session, specs, spec.point,
                                                     spec.index, spec.repeat, spec.label, last_p50.get(spec.arm))
                p50 = (result.steady_state or {}).get("e2el_p50_s")
                if p50:  # sizes this arm's next multi-process step (step.pilot_schedule)
                    last_p50[spec.arm] = p50
                d = Done(by_name[spec.arm], result, spec, len(done))
                done.append(d)
                on_step(d)
                cols = summary.columns(result.records, cfg.slo)
                key = (spec.arm, spec.point)
                pooled[key] = pooled[key] + cols if key in pooled else cols
                plan.observe(spec, outcome(cfg, result, pooled[key]))
    return done, stopped


def check(cfg: LoadtestConfig, variant: str | None) -> list[str]:
    """The variants this run measures (``loadtest.arms`` come beside them), or a ValueError naming
    the key that makes it impossible. ``variant`` may name a ``loadtest.arms`` entry: that arm alone
    (``run`` keeps only it in ``cfg.arms``)."""
    if not variant and cfg.variants is None:
        raise ValueError("loadtest.variants is null: list the variants to compare, or read the config "
                         "through params.yaml (null there = base and every quantize.variants entry with serve: true)")
    if variant and arms_mod.arm_config(cfg, variant) is not None:
        variants = []
    else:
        variants = [variant] if variant else list(dict.fromkeys(cfg.variants))
    if not variants and not cfg.arms:
        raise ValueError("nothing to measure: loadtest.variants is [] and loadtest.arms is empty")
    if cfg.base_url and len(variants) > 1:
        raise ValueError(f"loadtest.base_url names one endpoint; compare {variants} with managed servers "
                         "(base_url: null) or load-test one variant at a time")
    unknown = [g for g in dict.fromkeys(cfg.gateway_arms) if g not in variants]
    if unknown:
        raise ValueError(f"loadtest.gateway_arms names {', '.join(map(repr, unknown))}, not among the variants "
                         f"of this run {variants}: a gateway arm shares its variant's server")
    if cfg.gateway_arms and cfg.via_gateway:
        raise ValueError("loadtest.via_gateway puts the gateway in front of every arm, gateway_arms adds a "
                         "gateway arm beside a direct one: set one of them")
    taken = set(arms_mod.arm_names(variants, cfg.gateway_arms))
    clash = [a.name for a in cfg.arms if a.name in taken]
    if clash:
        raise ValueError(f"loadtest.arms names {clash}, already the name of a variant or gateway arm of this run")
    urls = [a for a in cfg.arms if a.kind == "url"]
    if urls and cfg.via_gateway:  # the gateway's config file would have to hold the arm's key
        raise ValueError(f"loadtest.via_gateway with the URL arm(s) {[a.name for a in urls]}: the gateway "
                         "fronts managed servers only; compare a URL arm directly")
    for a in urls:
        arms_mod.api_key(a)  # an unset key variable fails now, named, before any server starts
    names = arms_mod.arm_names(variants, cfg.gateway_arms, cfg.arms)
    if cfg.control is not None and cfg.control not in names:
        raise ValueError(f"loadtest.control '{cfg.control}' is not an arm of this run {names}")
    return variants


def run(cfg: LoadtestConfig, variant: str | None = None, stage: str = rep.STAGE) -> Report:
    """Load-test ``variant``, or, with None, compare ``cfg.variants`` in counterbalanced blocks (a
    report per arm, and ``reports/loadtest/all.json`` with the run's order, the control's drift and
    the paired comparisons). ``variant`` is ``cfg.variant`` given here: the report's config records
    it. Each variant in ``cfg.gateway_arms`` gets a second arm on its server, ``<variant>@gateway``,
    compared with the direct one in all.json (written then even for one ``variant``, whose report
    is returned). ``stage``: the reports' folder under reports/ (the speed stage's own runs)."""
    if variant:
        cfg = cfg.model_copy(update={"variant": variant})
    variant = cfg.variant
    if variant:  # one arm alone: a variant (no loadtest.arms beside it), or a loadtest.arms entry
        cfg = cfg.model_copy(update={"arms": [a for a in cfg.arms if a.name == variant]})
    variants = check(cfg, variant)
    names = arms_mod.arm_names(variants, cfg.gateway_arms, cfg.arms)
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    outputs: dict[str, dict[str, str]] = {v: {} for v in names}
    for v in names:
        d = Path(cfg.out_dir) / v
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("step-*.jsonl"):  # a previous run's steps must not linger beside ours
            stale.unlink()

    def on_step(d: Done) -> None:  # raw records reach disk as each step ends
        path = rep.write_records(d.result, Path(cfg.out_dir) / d.arm.variant)
        outputs[d.arm.variant][f"records_{d.result.label}"] = str(path)

    with contextlib.ExitStack() as stack:
        arms, infos, failed = arms_mod.open_arms(cfg, variants, stack)
        plan = make_plan(cfg, [a.variant for a in arms])
        done, stopped = run_async(execute(cfg, plan, arms, on_step)) if arms else ([], None)
    knees = plan.knees() if arms else {}
    reports = {v: rep.variant_report(cfg, v, done, knees.get(v), infos[v], outputs[v], run_id, stopped, stage)
               for v in names if v in infos}
    reports.update({v: rep.not_servable(cfg, v, err, stage) for v, err in failed.items()})
    if variant and not cfg.gateway_arms:
        return reports[variant]
    compared = compare.compared_report(cfg, variants, names, done, knees, infos, reports, run_id, stopped, stage)
    return reports[variant] if variant else compared
