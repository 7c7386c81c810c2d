"""The recommender: which variant to deploy, decided on evidence, never on noise.

Pure: it takes each variant's evidence (raw per-question and per-document records, size, the
load test's typed result at the target rate) and returns a typed ``Decision`` with its reasons.

1. **Eligible**: evaluated, not flagged broken by the quantize stage, no non-finite measurement,
   a known size within the memory budget (when one is set), load-tested at (not only below) the
   target rate and not shown to fail the SLO there (``undecided`` is eligible, and the reason says
   so). Anything else is ineligible with the reason named; nothing raises.
2. **Ranked criterion by criterion**. On each quality criterion **every pair** of remaining
   candidates is compared on the units both were scored on, and a candidate significantly worse
   than **any** other is dropped:
   a. perplexity (paired cluster bootstrap over source pages),
   b. accuracy (Newcombe's paired interval, its p-value inverting it).
   The family-wise error rate over both quality criteria is at most ``stats.ALPHA``: Holm's
   step-down correction over the pairs of each criterion, at ALPHA split equally (Bonferroni)
   over the quality criteria that have evidence. So a candidate as good as the best is dropped on
   quality with probability <= 5 % (benchmarks/decision_rule.py measures it), and no kept
   candidate is significantly worse than another kept one.
   c. size on disk (within ``size_tie_pct`` of the smallest is a tie),
   d. speed at the target rate (E2E latency, Mann-Whitney U, every pair, Holm at ALPHA; skipped
      when the load test's drift control moved, since then no speed comparison is reliable).
   e. cost (``report.prices``): a deterministic tie-break, not a test. Among the candidates every
      statistical step above kept, the cheapest per million output tokens at its sustained SLO
      rate is kept (``cost_tie_pct`` of it is a tie); it needs a cost for every one of them, else
      it is skipped and the reason names who has no price. Why a tie-break and not an eligibility
      bound: quality, the SLO and speed are decided first with their error rates intact (the
      cost step only chooses among candidates no test could separate, so it cannot make the rule
      drop a better one), and a price is exact while a cost bound would need a budget the
      project does not have. Its interval (carried from the rate's) is shown, not tested.
3. Still tied after every criterion: the first in ``report.variants`` order. This is the only
   place the order counts: every comparison is made for every pair, so the kept sets are the same
   for any order, and the reason says that no test separates the tied candidates and how many
   more questions, documents or requests would resolve the observed difference.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict

from workbench import stats
from workbench.config import ReportConfig
from workbench.loadgen import timecompare
from workbench.recommend_evidence import Candidate, _finite, accuracy_diff, eligibility, ppl_change


class Step(BaseModel):
    """One criterion: who stayed, who was dropped (with the comparison that dropped it) and who
    stayed without being separated (with the evidence)."""

    model_config = ConfigDict(extra="forbid")

    criterion: str
    kept: list[str]
    dropped: dict[str, str] = {}  # variant -> the evidence that dropped it
    ties: dict[str, str] = {}  # variant -> the evidence that it is not separated from the best
    method: str = ""  # the test and its correction, as the report names them
    alpha: float | None = None  # the family-wise level of this criterion's comparisons
    pairs: int = 0  # comparisons made (the Holm family's size)


class Decision(BaseModel):
    """The recommendation: ``variant`` (None when nothing qualifies) and why."""

    model_config = ConfigDict(extra="forbid")

    variant: str | None
    reason: str
    rejected: dict[str, str] = {}  # ineligible variant -> why
    tied_with: list[str] = []  # candidates no test separated from the chosen one
    slo_undecided: bool = False
    steps: list[Step] = []
    correction: str = ""  # the multiplicity correction, in words
    power: list[str] = []  # what the data could detect (filled by the report stage)


def _pairwise(cands: list[Candidate], criterion: str, score: Callable[[Candidate], float | None],
              lower_is_better: bool, compare: Callable[[Candidate, Candidate], stats.Comparison | None],
              alpha: float, method: str, text: Callable[[stats.Comparison, float], str],
              a_is_worse: Callable[[stats.Comparison], bool]) -> Step:
    """One criterion over every pair of candidates that have it. Each pair is compared once, in
    a canonical order (by name), so the result does not depend on the candidates' order; Holm
    over the family of pairs at ``alpha``; a candidate significantly worse than any other is
    dropped."""
    scored = sorted((c for c in cands if score(c) is not None), key=lambda c: c.variant)
    if len(scored) < 2:
        return Step(criterion=criterion, kept=[c.variant for c in cands], method=method)
    cmps = []
    for a, b in itertools.combinations(scored, 2):
        cmp = compare(a, b)
        if cmp is not None and cmp.diff.value is not None and cmp.p_value is not None:
            cmps.append((a, b, cmp))
    reject, adjusted = stats.holm([c.p_value for _, _, c in cmps], alpha)
    worse_than: dict[str, list[tuple[float, str]]] = {}
    for (a, b, cmp), rej, p_adj in zip(cmps, reject, adjusted):
        if rej:
            a_worse = a_is_worse(cmp)
            loser, winner = (a, b) if a_worse else (b, a)
            worse_than.setdefault(loser.variant, []).append(
                (p_adj, f"{text(cmp if a_worse else _mirror(cmp), p_adj)} vs {winner.variant}"))
    dropped = {v: min(ev)[1] for v, ev in worse_than.items()}
    if len(dropped) == len(cands):  # a cycle of significant differences: nothing to stand on
        return Step(criterion=criterion, kept=[c.variant for c in cands], method=method, alpha=alpha,
                    pairs=len(cmps), ties={v: f"not dropped: the comparisons contradict each other ({e})"
                                           for v, e in dropped.items()})
    kept = [c.variant for c in cands if c.variant not in dropped]
    best = (min if lower_is_better else max)((c for c in scored if c.variant in kept), key=score, default=None)
    ties = {}
    for c in cands:
        if c.variant in dropped or best is None or c is best:
            continue
        if c not in scored:
            ties[c.variant] = f"no {criterion} on the same units as the others"
            continue
        pair = next(((a, b, x, p) for (a, b, x), p in zip(cmps, adjusted) if {a.variant, b.variant}
                     == {c.variant, best.variant}), None)
        if pair is None:
            ties[c.variant] = f"no {criterion} on the same units as {best.variant}"
        else:
            a, _, cmp, p_adj = pair
            ties[c.variant] = f"{text(cmp if a is c else _mirror(cmp), p_adj)} vs {best.variant}: within noise"
    return Step(criterion=criterion, kept=kept, dropped=dropped, ties=ties, method=method, alpha=alpha,
                pairs=len(cmps))


def _mirror(cmp: stats.Comparison) -> stats.Comparison:
    """b against a from a against b (a difference changes sign; a % change or ratio inverts)."""
    d = cmp.diff
    if cmp.method.startswith("paired cluster bootstrap"):  # % change: (1+x/100)^-1
        f = lambda x: None if x is None else 100 * (100 / (100 + x) - 1)  # noqa: E731
        new = d.model_copy(update={"value": f(d.value), "lo": f(d.hi), "hi": f(d.lo)})
    elif cmp.method == "mann-whitney u":  # ratio of medians
        f = lambda x: None if not x else 1 / x  # noqa: E731
        new = d.model_copy(update={"value": f(d.value), "lo": f(d.hi), "hi": f(d.lo)})
    else:
        f = lambda x: None if x is None else 0.0 - x  # noqa: E731  (0.0 - 0.0 is 0.0, not -0.0)
        new = d.model_copy(update={"value": f(d.value), "lo": f(d.hi), "hi": f(d.lo)})
    return cmp.model_copy(update={"diff": new})


def _more(cmp: stats.Comparison, units: str) -> str:
    return f"; ~{cmp.n_to_resolve} {units} would resolve it" if cmp.n_to_resolve else ""


def _p(cmp: stats.Comparison, p_adj: float) -> str:
    def fmt(p: float) -> str:  # a bootstrap p of 0 means below 1 / resamples
        return "< 0.001" if p < 0.001 else f"= {p:.2g}"

    return f"p {fmt(cmp.p_value)}, Holm-adjusted {fmt(p_adj).removeprefix('= ')}"


def _by_perplexity(cands: list[Candidate], alpha: float, seed: int) -> Step:
    def text(cmp: stats.Comparison, p_adj: float) -> str:
        pages = cmp.details.get("pages")
        return (f"perplexity {cmp.diff.text('+.1f', unit=' %')} ({_p(cmp, p_adj)}, n = {cmp.n} documents"
                f"{f' from {pages} pages' if pages else ''}{_more(cmp, 'documents') if p_adj >= alpha else ''})")

    return _pairwise(cands, "perplexity", lambda c: c.ppl.value if c.ppl is not None and c.documents else None,
                     True, lambda a, b: ppl_change(a, b, seed), alpha,
                     f"paired cluster bootstrap over pages, every pair, Holm at alpha = {alpha:.3g}", text,
                     lambda cmp: cmp.diff.value > 0)


def _by_accuracy(cands: list[Candidate], suite: str, alpha: float) -> Step:
    def text(cmp: stats.Comparison, p_adj: float) -> str:
        return (f"{suite} accuracy {cmp.diff.text('+.3f')} ({_p(cmp, p_adj)}, n = {cmp.n}"
                f"{_more(cmp, 'questions') if p_adj >= alpha else ''})")

    return _pairwise(cands, f"{suite} accuracy", lambda c: c.accuracy[suite].value if suite in c.accuracy else None,
                     False, lambda a, b: accuracy_diff(a, b, suite), alpha,
                     f"Newcombe paired interval (method 10), every pair, Holm at alpha = {alpha:.3g}", text,
                     lambda cmp: cmp.diff.value < 0)


def _by_size(cands: list[Candidate], tie_pct: float) -> Step:
    sized = [c for c in cands if c.bytes]
    if len(sized) < 2:
        return Step(criterion="size", kept=[c.variant for c in cands])
    smallest = min(c.bytes for c in sized)
    kept, dropped, ties = [], {}, {}
    for c in cands:
        if c.bytes and c.bytes > smallest * (1 + tie_pct / 100):
            dropped[c.variant] = f"{c.bytes / 1e6:.0f} MB vs {smallest / 1e6:.0f} MB (more than {tie_pct:g} % larger)"
        else:
            kept.append(c.variant)
            if c.bytes and c.bytes != smallest:
                ties[c.variant] = f"{c.bytes / 1e6:.1f} MB, within {tie_pct:g} % of the smallest ({smallest / 1e6:.1f} MB)"
    return Step(criterion="size", kept=kept, dropped=dropped, ties=ties, method=f"within {tie_pct:g} % is a tie")


def _by_speed(cands: list[Candidate], drifted: bool) -> Step:
    """Every pair on E2E latency at the target rate, from one median per block of the load test,
    paired by block (the counterbalanced design: a host that drifts moves both arms of a block,
    and the paired log-ratio cancels it), Holm over the pairs. ``drifted`` (the control's spread
    over the blocks exceeded its tolerance) no longer gates the comparison: it is said beside it."""
    timed = [c for c in cands if len(c.e2el_blocks) >= 2]
    if len(timed) < 2:
        return Step(criterion="speed", kept=[c.variant for c in cands])

    def compare(a: Candidate, b: Candidate) -> stats.Comparison | None:
        common = sorted(set(a.e2el_blocks) & set(b.e2el_blocks))
        if len(common) < 2:
            return None
        return timecompare.compare_arms([a.e2el_blocks[k] for k in common], [b.e2el_blocks[k] for k in common])

    def text(cmp: stats.Comparison, p_adj: float) -> str:
        return f"E2E latency x{cmp.diff.text('.2f')} ({_p(cmp, p_adj)}, n = {cmp.n} blocks)"

    note = "; the control drifted across the run (paired blocks cancel a shared drift)" if drifted else ""
    return _pairwise(cands, "speed", lambda c: float(np.median(list(c.e2el_blocks.values())))
                     if len(c.e2el_blocks) >= 2 else None, True, compare, stats.ALPHA,
                     f"paired t on per-block E2E p50 log-ratios, every pair, Holm at alpha = {stats.ALPHA:.3g}"
                     + note, text, lambda cmp: cmp.diff.value > 1)


def _by_cost(cands: list[Candidate], tie_pct: float) -> Step:
    """The cheapest per million output tokens, a deterministic tie-break (module docstring, e)."""
    method = f"tie-break on price per 1e6 output tokens at the sustained rate (within {tie_pct:g} % is a tie)"
    unpriced = [c.variant for c in cands if c.cost is None or not _finite(c.cost.value)]
    currencies = {c.cost_currency for c in cands if c.variant not in unpriced}
    if unpriced or len(currencies) > 1:
        why = (f"no cost for {', '.join(unpriced)} (report.prices, or no sustained rate)" if unpriced
               else f"prices in different currencies {sorted(currencies)}")
        return Step(criterion="cost", kept=[c.variant for c in cands], method=method,
                    ties={cands[0].variant: f"cost not weighed: {why}"})
    cheapest = min(cands, key=lambda c: c.cost.value)
    bound = cheapest.cost.value * (1 + tie_pct / 100)
    kept, dropped, ties = [], {}, {}
    fmt = lambda c: f"{c.cost.text('.3g')} {c.cost_currency} per 1e6 output tokens"  # noqa: E731
    for c in cands:
        if c.cost.value > bound:
            dropped[c.variant] = f"{fmt(c)} vs {fmt(cheapest)} for {cheapest.variant}"
        else:
            kept.append(c.variant)
            if c is not cheapest:
                ties[c.variant] = f"{fmt(c)}, within {tie_pct:g} % of {cheapest.variant}'s {fmt(cheapest)}"
    return Step(criterion="cost", kept=kept, dropped=dropped, ties=ties, method=method)


def quality_alpha(cands: list[Candidate], suite: str) -> tuple[float, int]:
    """ALPHA split (Bonferroni) over the quality criteria on which >= 2 candidates have evidence."""
    with_ppl = sum(1 for c in cands if c.ppl is not None and c.ppl.value is not None and c.documents)
    with_acc = sum(1 for c in cands if suite in c.accuracy and c.accuracy[suite].value is not None)
    k = max(1, int(with_ppl >= 2) + int(with_acc >= 2))
    return stats.ALPHA / k, k


def recommend(cands: list[Candidate], cfg: ReportConfig, drifted: bool = False, seed: int = 0) -> Decision:
    """The decision (see the module docstring): the same for every order of ``cands`` and of
    ``cfg.variants``, except the final tie-break among candidates no test separates."""
    order = {v: i for i, v in enumerate(cfg.variants or [])}
    rank = lambda c: (order.get(c.variant, math.inf), c.variant)  # noqa: E731
    rejected = {c.variant: w for c in sorted(cands, key=rank) if (w := eligibility(c, cfg))}
    pool = sorted((c for c in cands if c.variant not in rejected), key=rank)
    if not pool:
        return Decision(variant=None, rejected=rejected,
                        reason="no variant qualifies: " + "; ".join(f"{v}: {w}" for v, w in rejected.items()))
    suite = cfg.accuracy_metric.removesuffix("_acc")
    alpha_q, k_q = quality_alpha(pool, suite)
    correction = (f"Holm over every pair within each criterion; quality (perplexity, {cfg.accuracy_metric}) at "
                  f"family-wise alpha = {stats.ALPHA:g}" + (f", split over {k_q} criteria (Bonferroni, "
                                                             f"{alpha_q:.3g} each)" if k_q > 1 else ""))
    steps: list[Step] = []
    criteria = [lambda p: _by_perplexity(p, alpha_q, seed), lambda p: _by_accuracy(p, suite, alpha_q),
                lambda p: _by_size(p, cfg.size_tie_pct), lambda p: _by_speed(p, drifted)]
    if any(c.cost is not None for c in pool):  # report.prices names an arm of this decision
        criteria.append(lambda p: _by_cost(p, cfg.cost_tie_pct))
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
        acc = chosen.accuracy.get(suite)
        reason += f", {cfg.accuracy_metric} {acc.text('.3f')}" if acc and acc.value is not None else ""
        reason += f", {chosen.bytes / 1e6:.0f} MB)" if chosen.bytes else ")"
    if chosen.cost is not None and chosen.cost.value is not None:
        reason += f", costing {chosen.cost.text('.3g')} {chosen.cost_currency} per 1e6 output tokens"
    evidence = []
    for s in steps:  # every criterion that was weighed, with what it showed
        parts = [f"{v} dropped, {w}" for v, w in s.dropped.items()] + [f"{v} tied, {w}" for v, w in s.ties.items()]
        if parts:
            evidence.append(f"{s.criterion}: " + "; ".join(parts))
    if evidence:
        reason += ". " + ". ".join(evidence)
    if tied:
        reason += (f". No test separates it from {', '.join(tied)}; "
                   f"{chosen.variant} comes first in report.variants (the only use of that order)")
    elif not steps:
        reason += ". The only eligible variant"
    undecided = chosen.load is not None and chosen.load.slo.overall is stats.Verdict.undecided
    if undecided:
        reason += (f". Its SLO at {chosen.load.offered_req_per_s:g} req/s is undecided on {chosen.load.requests} "
                   f"requests (goodput {chosen.load.goodput.text('.2f')}): not shown to fail, not shown to pass")
    if drifted:
        reason += ". The load test's drift control moved during the run, so speed was not compared"
    return Decision(variant=chosen.variant, reason=reason, rejected=rejected, tied_with=tied,
                    slo_undecided=undecided, steps=steps, correction=correction)
