"""The recommender: which variant to deploy, decided on evidence, never on noise.

Pure: it takes each variant's evidence (raw per-question and per-document records, size, the
load test's typed result at the target rate) and returns the decision with its reasons.

1. **Eligible**: evaluated, not flagged broken by the quantize stage, within the memory budget,
   load-tested at the target rate and not shown to fail the SLO there (``undecided`` is eligible,
   and the reason says so).
2. **Ranked criterion by criterion**; at each, the best by point estimate stays, and so does every
   candidate the evidence does not separate from it (a tie); a candidate significantly worse is
   dropped, so a variant of significantly worse quality than an eligible alternative is never
   recommended:
   a. perplexity (paired bootstrap over the same documents),
   b. accuracy (exact McNemar on the same questions),
   c. size on disk (within ``size_tie_pct`` of the smallest is a tie),
   d. speed at the target rate (E2E latency, Mann-Whitney U on the requests; skipped when the
      load test's drift control moved, since then no speed comparison is reliable).
3. Still tied after every criterion: the first in ``report.variants`` order, and the reason says
   that the evidence does not separate them and how many more questions, documents or requests
   would resolve the observed difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from workbench import stats
from workbench.config import ReportConfig
from workbench.loadgen.summary import RateSummary


@dataclass
class Candidate:
    variant: str
    bytes: float | None = None
    broken: bool = False
    evaluated: bool = False
    questions: dict[str, dict[str, bool]] = field(default_factory=dict)  # suite -> question id -> correct
    documents: dict[str, tuple[float, float]] = field(default_factory=dict)  # doc id -> (loglik, words)
    ppl: stats.Estimate | None = None
    accuracy: dict[str, stats.Estimate] = field(default_factory=dict)  # suite -> share correct
    load: RateSummary | None = None  # the load test at the target rate
    e2el_ms: list[float] = field(default_factory=list)  # its requests' E2E latencies
    why_not: str | None = None  # set when not eligible


def ppl_change(a: Candidate, b: Candidate, seed: int = 0) -> stats.Comparison | None:
    """a's word perplexity as a % change over b's, on the documents both were scored on."""
    common = sorted(set(a.documents) & set(b.documents))
    if len(common) < 2:
        return None
    la = [a.documents[d][0] for d in common]
    lb = [b.documents[d][0] for d in common]
    words = [b.documents[d][1] for d in common]
    return stats.perplexity_change(la, lb, words, seed=seed)


def accuracy_diff(a: Candidate, b: Candidate, suite: str) -> stats.Comparison | None:
    qa, qb = a.questions.get(suite, {}), b.questions.get(suite, {})
    common = sorted(set(qa) & set(qb))
    if not common:
        return None
    return stats.mcnemar([qa[q] for q in common], [qb[q] for q in common])


def eligibility(c: Candidate, cfg: ReportConfig) -> str | None:
    """Why ``c`` cannot be recommended, or None."""
    if c.broken:
        return "flagged broken by the quantize stage's perplexity check"
    if not c.evaluated:
        return "not evaluated"
    if cfg.memory_budget_bytes and (c.bytes or 0) > cfg.memory_budget_bytes:
        return f"{(c.bytes or 0) / 1e6:.0f} MB exceeds the {cfg.memory_budget_bytes / 1e6:.0f} MB budget"
    if c.load is None:
        return f"no load test at {cfg.target_rate_req_per_s:g} req/s"
    if c.load.slo.overall is stats.Verdict.failed:
        lat = c.load.latency["ttft"].at(99)
        return (f"shown to fail the SLO at {c.load.offered_req_per_s:g} req/s (goodput "
                f"{c.load.goodput.text('.2f')}, TTFT p99 {lat.text('.0f', unit=' ms')}, n = {c.load.requests})")
    return None


@dataclass
class Step:
    criterion: str
    kept: list[str]
    dropped: dict[str, str]  # variant -> the evidence that dropped it
    ties: dict[str, str]  # variant -> the evidence that it is not separated from the best


def _by_paired(cands: list[Candidate], criterion: str, score: Callable[[Candidate], float | None],
               lower_is_better: bool, compare: Callable[[Candidate, Candidate], stats.Comparison | None],
               worse: Callable[[stats.Comparison], str], tie: Callable[[stats.Comparison], str]) -> Step:
    """One quality criterion: the best by point estimate stays; every other candidate is compared
    with it on the same units (``compare(c, best)``) and dropped only when significantly worse."""
    scored = [c for c in cands if score(c) is not None]
    if len(scored) < 2:
        return Step(criterion, [c.variant for c in cands], {}, {})
    best = (min if lower_is_better else max)(scored, key=score)
    kept, dropped, ties = [best.variant], {}, {}
    for c in cands:
        if c is best:
            continue
        cmp = compare(c, best) if c in scored else None
        if cmp is None or cmp.diff.value is None:
            kept.append(c.variant)
            ties[c.variant] = f"no {criterion} on the same units as {best.variant}"
        elif cmp.significant and (cmp.diff.value > 0) == lower_is_better:
            dropped[c.variant] = f"{worse(cmp)} vs {best.variant}"
        else:
            kept.append(c.variant)
            ties[c.variant] = f"{tie(cmp)} vs {best.variant}: within noise"
    return Step(criterion, kept, dropped, ties)


def _more(cmp: stats.Comparison, units: str) -> str:
    return f"; ~{cmp.n_to_resolve} {units} would resolve it" if cmp.n_to_resolve else ""


def _by_perplexity(cands: list[Candidate], seed: int) -> Step:
    return _by_paired(
        cands, "perplexity", lambda c: c.ppl.value if c.ppl is not None and c.documents else None, True,
        lambda c, best: ppl_change(c, best, seed),
        lambda cmp: f"perplexity {cmp.diff.text('+.1f', unit=' %')} (n = {cmp.n} documents)",
        lambda cmp: f"perplexity {cmp.diff.text('+.1f', unit=' %')} (n = {cmp.n} documents{_more(cmp, 'documents')})")


def _by_accuracy(cands: list[Candidate], suite: str) -> Step:
    return _by_paired(
        cands, f"{suite} accuracy", lambda c: c.accuracy[suite].value if suite in c.accuracy else None, False,
        lambda c, best: accuracy_diff(c, best, suite),
        lambda cmp: f"{suite} accuracy {cmp.text('+.3f')}",
        lambda cmp: (f"{suite} accuracy {cmp.diff.text('+.3f')} (McNemar p = {cmp.p_value:.2g}, "
                     f"n = {cmp.n}{_more(cmp, 'questions')})"))


def _by_size(cands: list[Candidate], tie_pct: float) -> Step:
    sized = [c for c in cands if c.bytes]
    if len(sized) < 2:
        return Step("size", [c.variant for c in cands], {}, {})
    smallest = min(c.bytes for c in sized)
    kept, dropped, ties = [], {}, {}
    for c in cands:
        if c.bytes and c.bytes > smallest * (1 + tie_pct / 100):
            dropped[c.variant] = f"{c.bytes / 1e6:.0f} MB vs {smallest / 1e6:.0f} MB (more than {tie_pct:g} % larger)"
        else:
            kept.append(c.variant)
            if c.bytes and c.bytes != smallest:
                ties[c.variant] = f"{c.bytes / 1e6:.1f} MB, within {tie_pct:g} % of the smallest ({smallest / 1e6:.1f} MB)"
    return Step("size", kept, dropped, ties)


def _by_speed(cands: list[Candidate], drifted: bool) -> Step:
    timed = [c for c in cands if c.e2el_ms]
    if len(timed) < 2:
        return Step("speed", [c.variant for c in cands], {}, {})
    if drifted:
        return Step("speed", [c.variant for c in cands], {},
                    {c.variant: "speed not compared: the load test's drift control moved" for c in cands})
    best = min(timed, key=lambda c: float(np.median(c.e2el_ms)))
    kept, dropped, ties = [best.variant], {}, {}
    for c in cands:
        if c is best:
            continue
        if not c.e2el_ms:
            kept.append(c.variant)
            continue
        cmp = stats.compare_samples(c.e2el_ms, best.e2el_ms)
        if cmp.significant and cmp.diff.value > 1:
            dropped[c.variant] = f"E2E latency x{cmp.text('.2f')} vs {best.variant}"
        else:
            kept.append(c.variant)
            ties[c.variant] = f"E2E latency x{cmp.text('.2f')} vs {best.variant}: within noise"
    return Step("speed", kept, dropped, ties)


def recommend(cands: list[Candidate], cfg: ReportConfig, drifted: bool = False, seed: int = 0) -> dict:
    """The decision: ``variant`` (None when nothing qualifies), ``reason``, ``rejected`` (ineligible,
    with why), ``steps`` (each criterion: kept, dropped with evidence, ties with evidence)."""
    order = {v: i for i, v in enumerate(cfg.variants or [])}
    rejected = {c.variant: w for c in cands if (w := eligibility(c, cfg))}
    pool = sorted((c for c in cands if c.variant not in rejected), key=lambda c: order.get(c.variant, 1e9))
    if not pool:
        return {"variant": None, "rejected": rejected, "steps": [], "tied_with": [],
                "reason": "no variant qualifies: " + "; ".join(f"{v}: {w}" for v, w in rejected.items())}
    steps: list[Step] = []
    criteria = [lambda p: _by_perplexity(p, seed), lambda p: _by_accuracy(p, cfg.accuracy_metric.removesuffix("_acc")),
                lambda p: _by_size(p, cfg.size_tie_pct), lambda p: _by_speed(p, drifted)]
    for criterion in criteria:
        if len(pool) == 1:
            break
        step = criterion(pool)
        steps.append(step)
        pool = [c for c in pool if c.variant in step.kept]
    chosen, tied = pool[0], [c.variant for c in pool[1:]]
    reason = f"{chosen.variant}"
    if chosen.ppl is not None and chosen.ppl.value is not None:
        reason += f" (perplexity {chosen.ppl.text('.2f')}"
        acc = chosen.accuracy.get(cfg.accuracy_metric.removesuffix("_acc"))
        reason += f", {cfg.accuracy_metric} {acc.text('.3f')}" if acc and acc.value is not None else ""
        reason += f", {chosen.bytes / 1e6:.0f} MB)" if chosen.bytes else ")"
    evidence = []
    for s in steps:  # every criterion that was weighed, with what it showed
        parts = [f"{v} dropped, {w}" for v, w in s.dropped.items()] + [f"{v} tied, {w}" for v, w in s.ties.items()]
        if parts:
            evidence.append(f"{s.criterion}: " + "; ".join(parts))
    if evidence:
        reason += ". " + ". ".join(evidence)
    if tied:
        reason += (f". Nothing in the evidence separates it from {', '.join(tied)}; "
                   f"{chosen.variant} comes first in report.variants")
    elif not steps:
        reason += ". The only eligible variant"
    undecided = chosen.load is not None and chosen.load.slo.overall is stats.Verdict.undecided
    if undecided:
        reason += (f". Its SLO at {chosen.load.offered_req_per_s:g} req/s is undecided on {chosen.load.requests} "
                   f"requests (goodput {chosen.load.goodput.text('.2f')}): not shown to fail, not shown to pass")
    if drifted:
        reason += ". The load test's drift control moved during the run, so speed was not compared"
    return {"variant": chosen.variant, "reason": reason, "rejected": rejected, "tied_with": tied,
            "slo_undecided": undecided,
            "steps": [{"criterion": s.criterion, "kept": s.kept, "dropped": s.dropped, "ties": s.ties}
                      for s in steps]}
