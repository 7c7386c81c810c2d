"""What the recommendation's evidence could detect: its error rate and its power, in words.

Pure functions over the recommender's candidates; the report stage prints them under the
recommendation, and benchmarks/decision_rule.py checks the same rule by simulation:

    python benchmarks/decision_rule.py       # measured error rates and power (results/benchmarks/)

Power is computed at the rule's own level: ALPHA split over the quality criteria (Bonferroni),
then Holm's first step over the pairs of the candidates compared (ALPHA / criteria / pairs), the
level a single large difference must reach, so the figures are a lower bound.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from workbench import stats
from workbench.config import ReportConfig
from workbench.recommend import Candidate, quality_alpha
from workbench.recommend_evidence import _page

# The effect sizes the report speaks of: a 5-point accuracy difference (issue 28's example; the
# size of a clearly worse quantization on MMLU) and perplexity changes of 2 % and 5 % (4-bit
# quantizations of SmolLM2-135M cost +9-10 %, docs/ STACK.md; a good one on a larger model, 1-3 %).
ACC_EFFECT = 0.05
PPL_EFFECTS_PCT = (2.0, 5.0)
# The full benchmarks, for "what more data would give": MMLU's test split (cais/mmlu, 14,042
# questions) and C-Eval's (ceval/ceval-exam, test 12,342; lm-eval's ceval-valid scores val, 1,346).
FULL_SIZES = {"mmlu": [("the full MMLU test set", 14_042)],
              "ceval": [("the full C-Eval valid set", 1_346), ("the C-Eval test set", 12_342)]}
# Share of questions two variants answer differently, when fewer than two candidates show it:
# 4-bit variants of one model disagree on 10-30 % of MMLU questions (0.2 is the middle).
DEFAULT_DISCORDANT = 0.2


def _pairs(cands: list[Candidate]):
    return list(itertools.combinations(sorted(cands, key=lambda c: c.variant), 2))


def accuracy_power(cands: list[Candidate], cfg: ReportConfig) -> str | None:
    suite = cfg.accuracy_metric.removesuffix("_acc")
    scored = [c for c in cands if c.questions.get(suite)]
    if not scored:
        return None
    n = max(len(c.questions[suite]) for c in scored)
    shares = []
    for a, b in _pairs(scored):
        common = set(a.questions[suite]) & set(b.questions[suite])
        if common:
            shares.append(sum(a.questions[suite][q] != b.questions[suite][q] for q in common) / len(common))
    seen = float(np.median(shares)) if shares else None
    disc = max(seen if seen is not None else DEFAULT_DISCORDANT, 2 * ACC_EFFECT)
    alpha = quality_alpha(cands, suite)[0] / max(1, len(_pairs(scored)))
    p_here = stats.power_paired_accuracy(n, ACC_EFFECT, disc, alpha)
    full = "; ".join(f"on {name} ({size:,}), {stats.power_paired_accuracy(size, ACC_EFFECT, disc, alpha):.2f}"
                     for name, size in FULL_SIZES.get(suite, []))
    if seen is None:
        where = f"assuming the variants disagree on {disc:.0%} of the questions"
    elif disc > seen:
        where = (f"the variants disagreed on {seen:.0%} of the questions; computed at {disc:.0%}, "
                 f"the least a {ACC_EFFECT * 100:.0f}-point difference needs")
    else:
        where = f"the variants disagreed on {seen:.0%} of the questions"
    return (f"A {ACC_EFFECT * 100:.0f}-point {cfg.accuracy_metric} difference would be detected with probability "
            f"{p_here:.2f} on these {n} questions" + (f"; {full}" if full else "") +
            f" ({where}; level {alpha:.2g} per pair).")


def perplexity_power(cands: list[Candidate], cfg: ReportConfig) -> str | None:
    scored = [c for c in cands if len(c.documents) >= 2]
    if len(scored) < 2:
        return None
    ses, pages, docs = [], 0, 0
    for a, b in _pairs(scored):
        common = sorted(set(a.documents) & set(b.documents))
        if len(common) < 2:
            continue
        se, k = stats.log_ratio_se([a.documents[d][0] for d in common], [b.documents[d][0] for d in common],
                                   [b.documents[d][1] for d in common], [_page(d, b.documents[d]) for d in common])
        if math.isfinite(se):
            ses.append(se)
            pages, docs = max(pages, k), max(docs, len(common))
    if not ses:
        return None
    suite = cfg.accuracy_metric.removesuffix("_acc")
    alpha = quality_alpha(cands, suite)[0] / max(1, len(_pairs(scored)))
    se = float(np.median(ses))
    figs = ", ".join(f"a {e:g} % perplexity change with probability "
                     f"{stats.power_perplexity_change(e, se, pages, alpha):.2f}" for e in PPL_EFFECTS_PCT)
    return (f"On these {docs} documents from {pages} pages, {figs} (at the spread between pages seen "
            f"here; level {alpha:.2g} per pair).")


def statements(cands: list[Candidate], cfg: ReportConfig) -> list[str]:
    """The rule's error rate and the power the eligible candidates' evidence had, as sentences."""
    out = [f"Error rate: a variant as good as the best is dropped on quality with probability at most "
           f"{stats.ALPHA:.0%} (every pair compared, Holm within each criterion, {stats.ALPHA:g} split over the "
           "quality criteria); benchmarks/decision_rule.py measures it (README, \"Reading the report\")."]
    for line in (perplexity_power(cands, cfg), accuracy_power(cands, cfg)):
        if line:
            out.append(line)
    return out
