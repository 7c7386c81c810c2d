"""The arms side by side: each compared arm's quality, sustained SLO rate and cost per million
output tokens, every figure with its interval (``report_details.ArmPoint``), the picture of them
(``plots.quality_rate_cost``) and the report's markdown summary. Views of the evidence the report
stage gathered; ``workbench.report.run`` calls them, so the same command writes them:

    workbench report        # reports/report/quality_rate_cost.png, plots/quality_rate_cost.json, summary.md

The sustained rate is a bracket [lo, hi): lo the highest offered rate shown to pass the SLO, hi
the lowest one above it shown to fail (a knee search's bracket in knee mode). The cost carries it
(workbench/cost.py). The measured ceiling says the same in words, with what limited the arm where
it stopped keeping up (the load test's ``limited_by``) and the arm's rate cap, above which no
request was sent.
"""

from __future__ import annotations

import math

from workbench import stats
from workbench.config import ReportConfig
from workbench.evaluate.details import EvaluateDetails
from workbench.loadtest.details import ArmDetails
from workbench.recommend import Candidate, Decision
from workbench.report_details import ArmPoint
from workbench.reports import Report


def sustained_rate(lt: Report) -> stats.Estimate:
    """The arm's sustained rate at the SLO (req/s) as [lo, hi): lo the highest rate shown to pass
    it, hi the lowest rate above lo shown to fail it (None: none did, the rate is bounded only
    below). Knee mode: the search's bracket; a sweep brackets the same way with its swept rates
    (pooled over repeats), so its cost (carried from this interval) is bounded on both sides when a
    higher rate failed. ``value`` is lo, None when no rate passed."""
    d = ArmDetails.of(lt)
    if d.knee is not None:
        k = d.knee
        return stats.Estimate(value=k.lo, lo=k.lo, hi=k.hi, method="knee search bracket",
                              note="highest rate shown to pass the SLO; hi the lowest that did not")
    swept = [r for r in d.rates if r.concurrency is None]
    lo = max((r.offered_req_per_s for r in swept if r.slo.overall is stats.Verdict.passed), default=None)
    hi = min((r.offered_req_per_s for r in swept if r.slo.overall is stats.Verdict.failed
              and (lo is None or r.offered_req_per_s > lo)), default=None)
    return stats.Estimate(value=lo, lo=lo, hi=hi, method="sweep bracket",
                          note="highest swept rate shown to pass the SLO; hi the lowest above it shown to fail"
                               + ("" if hi is not None else " (none did: bounded below only)"))


def ceiling(d: ArmDetails, rate: stats.Estimate, cap: float | None) -> str:
    """The arm's measured ceiling in words: its bracket, what limited it at the first rate it did
    not pass (or the highest measured), and its rate cap."""
    if d.knee is not None:
        parts = [f"knee search: {d.knee.text()}"]
    else:
        swept = sorted(r.offered_req_per_s for r in d.rates if r.concurrency is None)
        if not swept:
            return "no open-loop rate measured"
        if rate.value is None:
            parts = [f"no swept rate shown to pass the SLO ({', '.join(f'{x:g}' for x in swept)} req/s)"]
        else:
            parts = [f"SLO met up to {rate.value:g} req/s" + (f", shown to fail at {rate.hi:g}" if rate.hi is not None
                                                                else f", none above shown to fail (swept to {swept[-1]:g})")]
    stop = [r for r in d.rates if r.concurrency is None and (r.offered_req_per_s == rate.hi if rate.hi is not None
                                                             else r.offered_req_per_s == max(x.offered_req_per_s for x in d.rates))]
    if stop and stop[0].limited_by:
        parts.append(f"at {stop[0].offered_req_per_s:g} req/s limited by {'; '.join(dict.fromkeys(stop[0].limited_by))}")
    if cap is not None:
        parts.append(f"capped at {cap:g} req/s (max_rate_req_per_s): higher rates were not sent")
    return "; ".join(parts)


def _finite(est: stats.Estimate | None) -> bool:
    return est is not None and est.value is not None and math.isfinite(est.value)


def arm_point(c: Candidate, lt: Report | None, ev: Report | None, cfg: ReportConfig) -> ArmPoint:
    """One arm's point: ``c`` the recommender's evidence, ``lt`` / ``ev`` its load-test and
    evaluate reports (None: not run)."""
    suite = cfg.accuracy_metric.removesuffix("_acc")
    point = ArmPoint(variant=c.variant, quality_metric=cfg.accuracy_metric, quality=c.accuracy.get(suite),
                     perplexity=c.ppl)
    if ev is not None:
        ed = EvaluateDetails.of(ev)
        point.perplexity_note = ed.not_evaluated or (ed.suites.get("perplexity") or {}).get("not_available")
    else:
        point.perplexity_note = "not evaluated (no evaluate report)"
    if lt is None:
        point.ceiling = "not load-tested (no load-test report)"
    else:
        d = ArmDetails.of(lt)
        cap = d.server.get("max_rate_req_per_s")
        point.engine, point.rate_cap_req_per_s = d.server.get("engine"), cap
        if d.not_servable:
            point.ceiling = f"not servable here: {d.not_servable}"
        else:
            point.sustained_req_per_s = sustained_rate(lt)
            point.ceiling = ceiling(d, point.sustained_req_per_s, cap)
    if c.cost is not None:
        point.cost_per_million_output_tokens, point.cost_currency = c.cost, c.cost_currency
        rate = point.sustained_req_per_s
        point.cost_note = (None if _finite(c.cost) else "no cost: no rate shown to meet the SLO to price it at"
                           if rate is not None and rate.value is None else c.cost.note)
    else:
        point.cost_note = "no price in report.prices" if c.variant not in cfg.prices else "no load test at the target rate"
    return point


def plot_rows(points: list[ArmPoint]) -> list[dict]:
    """reports/report/plots/quality_rate_cost.json: the picture's numbers, one row per arm."""
    rows = []
    for p in points:
        row: dict = {"variant": p.variant, "engine": p.engine}
        for key, est in (("quality", p.quality), ("sustained_req_per_s", p.sustained_req_per_s),
                         ("cost_per_million_output_tokens", p.cost_per_million_output_tokens)):
            ok = _finite(est)
            row[key] = est.value if ok else None
            row[f"{key}_ci_lo"] = est.lo if ok else None
            row[f"{key}_ci_hi"] = est.hi if ok else None
        rows.append(row)
    return rows


def _cell(est: stats.Estimate | None, fmt: str, missing: str = "n/a") -> str:
    return est.text(fmt) if _finite(est) else missing


def _no_rate(rate: stats.Estimate | None) -> str:
    if rate is not None and rate.hi is not None and math.isfinite(rate.hi):
        return f"< {rate.hi:g} (no rate passed)"
    return "none shown"


def arms_table(points: list[ArmPoint]) -> list[dict]:
    """The arms table as text (a view, never read back): each figure with its 95 % interval."""
    return [{
        "arm": p.variant, "engine": p.engine or "",
        p.quality_metric: _cell(p.quality, ".3f", "no quality"),
        "perplexity": _cell(p.perplexity, ".2f", p.perplexity_note or "n/a"),
        "sustained req/s at the SLO": _cell(p.sustained_req_per_s, ".3g", _no_rate(p.sustained_req_per_s)),
        "measured ceiling": p.ceiling,
        "cost per 1e6 output tokens": (f"{p.cost_per_million_output_tokens.text('.3g')} {p.cost_currency}"
                                       if _finite(p.cost_per_million_output_tokens) else p.cost_note or "n/a"),
    } for p in points]


def summary_markdown(decision: Decision, points: list[ArmPoint], load_md: str, picture: str | None) -> str:
    """reports/report/summary.md: the recommendation with its reasons, the arms side by side, the
    picture, and the load table."""
    from workbench.loadtest.report import markdown

    lines = ["# Report: which arm to serve", "",
             f"**{decision.variant or 'No arm qualifies'}**: {decision.reason}", ""]
    lines += [f"- {v}: not eligible, {why}" for v, why in decision.rejected.items()]
    lines += ["", "## Arms side by side (95 % intervals)", "", markdown(arms_table(points)).rstrip()]
    if picture:
        lines += ["", f"![quality vs sustained rate and cost]({picture})"]
    lines += ["", "## Load table (95 % intervals)", "", load_md.rstrip(), ""]
    return "\n".join(lines)
