"""A recommender candidate's evidence and what is read from it: ``Candidate`` (per-question and
per-document records, size, the load test at the target rate, cost), the paired comparisons of two
candidates on the units both were scored on, and ``eligibility``, step 1 of the decision rule in
``workbench/recommend.py`` (which the module docstring there states whole)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from workbench import stats
from workbench.config import ReportConfig
from workbench.loadgen.summary import RateSummary


class Document(NamedTuple):
    """One perplexity document's record: log-likelihood (nats), words, and its source page (the
    unit of independence; None: the document is its own page)."""

    loglik: float
    words: float
    page: str | None = None


@dataclass
class Candidate:
    variant: str
    bytes: float | None = None
    broken: bool = False
    evaluated: bool = False
    questions: dict[str, dict[str, bool]] = field(default_factory=dict)  # suite -> question id -> correct
    documents: dict[str, tuple] = field(default_factory=dict)  # doc id -> Document, or (loglik, words)
    ppl: stats.Estimate | None = None
    accuracy: dict[str, stats.Estimate] = field(default_factory=dict)  # suite -> share correct
    load: RateSummary | None = None  # the load test at the target rate
    e2el_ms: list[float] = field(default_factory=list)  # its requests' E2E latencies
    # Its E2E p50 (ms) in each block of the load test at the target rate: the unit the speed
    # comparison replicates over (requests within a step are autocorrelated; blocks pair arms).
    e2el_blocks: dict[int, float] = field(default_factory=dict)
    # Price per 1e6 output tokens at its sustained SLO rate (workbench/cost.py), in cost_currency;
    # None: no price in report.prices, or no rate to price.
    cost: stats.Estimate | None = None
    cost_currency: str = ""


def _page(doc_id: str, rec: tuple) -> str:
    return str(rec[2]) if len(rec) > 2 and rec[2] is not None else doc_id


def ppl_change(a: Candidate, b: Candidate, seed: int = 0) -> stats.Comparison | None:
    """a's word perplexity as a % change over b's, on the documents both were scored on,
    resampled by source page."""
    common = sorted(set(a.documents) & set(b.documents))
    if len(common) < 2:
        return None
    la = [a.documents[d][0] for d in common]
    lb = [b.documents[d][0] for d in common]
    words = [b.documents[d][1] for d in common]
    pages = [_page(d, b.documents[d]) for d in common]
    return stats.perplexity_change(la, lb, words, seed=seed, clusters=pages)


def accuracy_diff(a: Candidate, b: Candidate, suite: str) -> stats.Comparison | None:
    qa, qb = a.questions.get(suite, {}), b.questions.get(suite, {})
    common = sorted(set(qa) & set(qb))
    if not common:
        return None
    return stats.paired_accuracy([qa[q] for q in common], [qb[q] for q in common])


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def eligibility(c: Candidate, cfg: ReportConfig) -> str | None:
    """Why ``c`` cannot be recommended, or None. Fails closed: what cannot be checked is a reason."""
    if c.broken:
        return "flagged broken by the quantize stage's perplexity check"
    if not c.evaluated:
        return "not evaluated"
    bad = [d for d, rec in c.documents.items() if not (_finite(rec[0]) and _finite(rec[1]) and rec[1] > 0)]
    if bad:
        return (f"{len(bad)} perplexity record(s) not finite (e.g. {bad[0]}: {c.documents[bad[0]][:2]}): "
                "its perplexity cannot be trusted")
    if c.ppl is not None and c.ppl.value is not None and not _finite(c.ppl.value):
        return f"perplexity is {c.ppl.value}"
    if c.bytes is not None and not (_finite(c.bytes) and c.bytes > 0):
        return f"size on disk is {c.bytes}"
    if cfg.memory_budget_bytes:
        if c.bytes is None:
            return f"size on disk unknown: cannot show it fits the {cfg.memory_budget_bytes / 1e6:.0f} MB budget"
        if c.bytes > cfg.memory_budget_bytes:
            return f"{c.bytes / 1e6:.0f} MB exceeds the {cfg.memory_budget_bytes / 1e6:.0f} MB budget"
    if c.load is None:
        return f"no load test at {cfg.target_rate_req_per_s:g} req/s"
    if c.load.offered_req_per_s < cfg.target_rate_req_per_s * (1 - 1e-9):
        return (f"load-tested only up to {c.load.offered_req_per_s:g} req/s, below the target "
                f"{cfg.target_rate_req_per_s:g} req/s")
    if c.load.slo.overall is stats.Verdict.failed:
        lat = c.load.latency["ttft"].at(99)
        return (f"shown to fail the SLO at {c.load.offered_req_per_s:g} req/s (goodput "
                f"{c.load.goodput.text('.2f')}, TTFT p99 {lat.text('.0f', unit=' ms')}, n = {c.load.requests})")
    return None
