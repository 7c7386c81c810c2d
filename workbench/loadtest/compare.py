"""The compared run's own report, ``reports/loadtest/all.json``: the order the steps ran in (blocks
and their seeded permutations), the control's drift, the arms compared with the control paired
within blocks, and each gateway arm against its direct arm.

The design (plan.py): steps run in blocks, every arm once per block at one load point, in a seeded
order. What is paired: at one load point, an arm's step and the control's step of the SAME block
(same requests, same offsets, minutes apart at most). The unit of replication is the block, never
a request (requests in one step are autocorrelated: docs/reference.md). Drift is the control's
spread over the blocks of one load point, with an interval over blocks; it is reported, and the
paired comparisons carry it in their own block-to-block variance: there is no pass/fail gate.

``block_medians`` picks the per-block numbers; the statistics over blocks are
``workbench/loadgen/timecompare.py``'s (paired t on block log-ratios, Cochran's Q for the spread).
"""

from __future__ import annotations

import logging
from collections import defaultdict


from workbench import stats
from workbench.config import LoadtestConfig
from workbench.loadgen import summary, timecompare
from workbench.loadgen import timestats as ts
from workbench.loadgen.knee import KneeResult
from workbench.loadtest.details import ComparedDetails
from workbench.loadtest.arms import gateway_arm
from workbench.loadtest.plan import rate_caps
from workbench.loadtest.report import STAGE, VARIANT, point_label, workload_fingerprint
from workbench.reports import Report, write_report

log = logging.getLogger(__name__)
METRICS = ("ttft", "e2el")


DRIFT_TOLERANCE = 0.1  # the control may move 10 % between blocks before its spread counts as drift


def over_blocks(cmp: stats.Comparison) -> dict:
    """A block comparison's ratio as JSON, its method naming the unit (blocks, not requests)."""
    return cmp.diff.model_copy(update={"method": f"t over blocks ({cmp.method})"}).model_dump(mode="json")


def block_medians(cfg: LoadtestConfig, done: list, arm: str) -> dict[tuple, dict[int, dict[str, stats.Estimate]]]:
    """{(rate, concurrency): {block: {"ttft": median, "e2el": median}}} of ``arm``'s steps that
    reached steady state or could not tell (a step shown unsteady measures a ramp); each median
    with its block-bootstrap interval over the step's requests in send order."""
    out: dict[tuple, dict[int, dict[str, stats.Estimate]]] = defaultdict(dict)
    for d in done:
        if d.arm.variant != arm or d.result.steady_reached is False:
            continue
        cols = summary.columns(d.result.records, cfg.slo)
        meds = {k: ts.percentile(getattr(cols, f"{k}_ms"), 50, segments=cols.seg(k))
                for k in METRICS if getattr(cols, f"{k}_ms").size}
        if meds:
            out[(d.result.rate, d.result.concurrency)][d.block] = meds
    return out


def drift_spread(per_block: dict[int, dict[str, stats.Estimate]]) -> dict:
    """The control's spread over blocks at one load point, per metric: each block's median, the
    max/min ratio, the later blocks over the first (a t interval over blocks) and the spread test
    (``timecompare.drift_spread``: Cochran's Q on the block medians, between-block SD)."""
    blocks = sorted(per_block)
    out: dict = {"blocks": blocks}
    for k in METRICS:
        ests = [per_block[b][k] for b in blocks if k in per_block[b] and per_block[b][k].value]
        if len(ests) < 2:
            out[k] = None
            continue
        vals = [e.value for e in ests]
        later = timecompare.compare_arms(vals[1:], [vals[0]] * (len(vals) - 1))
        spread = timecompare.drift_spread(vals, [e.lo for e in ests], [e.hi for e in ests], DRIFT_TOLERANCE)
        out[k] = {"per_block_ms": vals, "max_over_min": max(vals) / min(vals),
                  "later_over_first": over_blocks(later),
                  "spread": spread.model_dump(mode="json")}
    return out


def compare_arms(arm: dict[int, dict[str, stats.Estimate]], control: dict[int, dict[str, stats.Estimate]]) -> dict:
    """An arm against the control at one load point, paired by block: per metric, the geometric
    mean over blocks of (arm median / control median in that block), with its t interval
    (``timecompare.compare_arms``)."""
    shared = sorted(set(arm) & set(control))
    out: dict = {"blocks": shared}
    for k in METRICS:
        pairs = [(arm[b][k].value, control[b][k].value) for b in shared if k in arm[b] and k in control[b]]
        pairs = [(x, y) for x, y in pairs if x and y and x > 0 and y > 0]
        cmp = timecompare.compare_arms([x for x, _ in pairs], [y for _, y in pairs])
        out[f"{k}_over_control"] = over_blocks(cmp)
        out[f"{k}_p_value"] = cmp.p_value
    return out


def drift_report(cfg: LoadtestConfig, done: list, names: list[str]) -> dict | None:
    """The control's drift at each load point it was measured at in two blocks or more."""
    control = cfg.control or (names[0] if names else None)
    if control is None:
        return None
    points = {point_label(r, c): drift_spread(b) for (r, c), b in block_medians(cfg, done, control).items()
              if len(b) >= 2}
    if not points:
        return {"control": control, "points": {}, "verdict": f"the control ({control}) was not measured in two "
                "blocks at one load point: no drift estimate"}
    spans = [p["ttft"]["max_over_min"] for p in points.values() if p.get("ttft")]
    drifted = any(p[k]["spread"]["drifted"] for p in points.values() for k in METRICS if p.get(k))
    verdict = (f"the control ({control}) across the run's blocks: TTFT p50 varied by up to "
               f"{max(spans):.2f}x between blocks at one load point" if spans else
               f"the control ({control}): no TTFT to compare across blocks")
    if drifted:
        verdict += (f"; more than sampling noise and more than {DRIFT_TOLERANCE:.0%} (Cochran's Q): the "
                    "arms' comparisons are paired within blocks, which cancels a drift they share")
    return {"control": control, "points": points, "verdict": verdict, "drifted": drifted}


def paired_report(cfg: LoadtestConfig, done: list, names: list[str]) -> dict:
    """Every other arm against the control, per load point, paired within blocks."""
    control = cfg.control or (names[0] if names else None)
    if control is None:
        return {}
    base = block_medians(cfg, done, control)
    out = {}
    for arm in names:
        if arm == control:
            continue
        mine = block_medians(cfg, done, arm)
        out[arm] = {point_label(*p): compare_arms(mine[p], base[p]) for p in mine if p in base}
    return {"control": control, "arms": out}


def gateway_comparison(cfg: LoadtestConfig, variant: str, done: list, knees: dict[str, KneeResult],
                       infos: dict[str, dict]) -> dict:
    """``variant``'s gateway arm against its direct arm, both on one server and the same requests:
    the ratio of their sustained rates (knee mode; its interval from the two knees' brackets), and
    at every offered rate both measured, TTFT and E2EL gateway/direct paired by block, beside each
    arm's SLO verdict."""
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

    def pooled(arm: str) -> dict[tuple, summary.Columns]:
        out: dict[tuple, summary.Columns] = {}
        for d in done:
            if d.arm.variant == arm:
                key, cols = (d.result.rate, d.result.concurrency), summary.columns(d.result.records, cfg.slo)
                out[key] = out[key] + cols if key in out else cols
        return out

    a, b = pooled(name), pooled(variant)
    ma, mb = block_medians(cfg, done, name), block_medians(cfg, done, variant)
    per_rate = []
    for key in sorted(set(a) & set(b), key=lambda k: (k[1] or 0, k[0])):
        paired = compare_arms(ma.get(key, {}), mb.get(key, {}))
        per_rate.append({
            "offered_req_per_s": key[0], "concurrency": key[1], "blocks": paired["blocks"],
            "ttft_gateway_over_direct": paired["ttft_over_control"],
            "e2el_gateway_over_direct": paired["e2el_over_control"],
            "slo_direct": summary.slo_verdict(b[key], cfg.slo).overall.value,
            "slo_gateway": summary.slo_verdict(a[key], cfg.slo).overall.value})
    return {"variant": variant, "direct_arm": variant, "gateway_arm": name,
            "gateway_url": infos.get(name, {}).get("via_gateway"),
            "sustained_req_per_s": {"direct": direct.lo if direct else None, "gateway": gw.lo if gw else None},
            "sustained_ratio": ratio.model_dump(mode="json") if ratio else None,
            "per_rate": per_rate}


def compared_report(cfg: LoadtestConfig, variants: list[str], names: list[str], done: list,
                    knees: dict[str, KneeResult], infos: dict[str, dict], reports: dict[str, Report],
                    run_id: str, stopped: str | None, stage: str = STAGE) -> Report:
    """``reports/<stage>/all.json``: the run's order (block, permutation), drift, comparisons."""
    via = [v for v in dict.fromkeys(cfg.gateway_arms) if v in infos]
    gateway = {gateway_arm(v): gateway_comparison(cfg, v, done, knees, infos) for v in via}
    metrics = {}
    for g in gateway.values():
        est = stats.Estimate.model_validate(g["sustained_ratio"]) if g["sustained_ratio"] else None
        if est is not None and est.value is not None:
            key = f"{g['variant']}.gateway_sustained_ratio"  # no '@': MLflow metric names
            metrics[key] = est.value
            metrics.update({f"{key}_ci_{side}": getattr(est, side) for side in ("lo", "hi")
                            if getattr(est, side) is not None})
    drift = drift_report(cfg, done, names)
    spans = [p["ttft"]["max_over_min"] for p in (drift or {}).get("points", {}).values() if p.get("ttft")]
    if spans:
        metrics["drift_ttft_max_over_min"] = max(spans)
    blocks: dict[int, list[str]] = defaultdict(list)
    for d in done:
        blocks[d.block].append(d.arm.variant)
    report = Report(
        stage=stage, variant=VARIANT, config=cfg.model_dump(mode="json"), data_fingerprint=workload_fingerprint(cfg),
        metrics=metrics,
        details=ComparedDetails.checked({"run": run_id, "variants": variants, "arms": names,
                 "not_servable": sorted(n for n in reports if n not in infos),
                 "design": {"order": cfg.order, "seed": cfg.seed, "control": (drift or {}).get("control"),
                            "blocks": [{"block": b, "arms": arms} for b, arms in sorted(blocks.items())]},
                 "order": [{"position": d.position, "variant": d.arm.variant, "label": d.result.label,
                            "repeat": d.repeat, "role": d.role, "block": d.block,
                            "steady_state": d.result.steady_reached} for d in done],
                 "drift": drift,
                 "paired": paired_report(cfg, done, names),
                 "gateway": gateway,
                 # a URL arm's offered-rate cap (req/s): above it the arm was not measured
                 "rate_caps": rate_caps(cfg),
                 "time_budget": {"max_duration_s": cfg.max_duration_s, "stopped": stopped},
                 "reports": {v: str(r.path) for v, r in reports.items()}}))
    write_report(report)
    if drift:
        log.info("%s", drift["verdict"])
    return report
