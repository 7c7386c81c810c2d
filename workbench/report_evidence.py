"""The report stage's inputs: each variant's stage reports (quantize, evaluate, load test) read into
the recommender's evidence (``Candidate``: per-question and per-document records, size, the load
test at the target rate, its cost) and into its row of the quantization table."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from workbench import evaluate, loadtest, stats, variants
from workbench.config import LoadtestConfig, ReportConfig, SLOConfig
from workbench.cost import cost_per_million_output_tokens
from workbench.evaluate.details import EvaluateDetails
from workbench.loadgen import summary
from workbench.loadgen.summary import RateSummary
from workbench.loadtest.details import ArmDetails
from workbench.quantize.details import QuantizeDetails
from workbench.recommend import Candidate, accuracy_diff, ppl_change
from workbench.recommend_evidence import Document
from workbench.report_arms import sustained_rate
from workbench.report_details import QuantRow
from workbench.reports import Report, read_report, report_path

log = logging.getLogger(__name__)
SUITES = ("mmlu", "ceval")


def _load(stage: str, variant: str) -> Report | None:
    path = report_path(stage, variant)
    if not path.exists():
        return None
    try:
        return read_report(path)
    except ValueError as err:
        log.warning("skipping %s: %s", path, err)
        return None


def at_rate(rates: list[RateSummary], rate: float) -> RateSummary | None:
    """The summary offered at ``rate`` (the nearest one at or above it, else the highest)."""
    if not rates:
        return None
    above = [r for r in rates if r.offered_req_per_s >= rate - 1e-9]
    return min(above, key=lambda r: r.offered_req_per_s) if above else max(rates, key=lambda r: r.offered_req_per_s)


def latencies_at(lt: Report, rate: float) -> dict[str, list[float]]:
    """TTFT and E2EL (ms) of every measured request offered at ``rate`` (all its repeats), as the
    load test's own ``summary.columns`` extracts them from the raw records."""
    slo = LoadtestConfig.model_validate(lt.config).slo if lt.config else SLOConfig()
    cols = [summary.columns(loadtest.read_records(s.records_file), slo) for s in loadtest.steps_of(lt)
            if s.offered_req_per_s == rate and s.role != "control-end" and s.records_file
            and Path(s.records_file).exists()]
    return {k: [float(x) for c in cols for x in getattr(c, f"{k}_ms")] for k in ("ttft", "e2el")}


def e2el_blocks_at(lt: Report, rate: float) -> dict[int, float]:
    """The E2E p50 (ms) of each block's steady step at ``rate``: the speed comparison's unit. A
    report without blocks (an older one) is keyed by repeat; a step that did not reach steady
    state is left out (it measured a ramp, not the rate)."""
    out: dict[int, float] = {}
    for s in loadtest.steps_of(lt):
        if s.offered_req_per_s != rate or s.role == "control-end":
            continue
        if s.steady_state is not None and s.steady_state.get("verdict", "steady") != "steady":
            continue
        p50 = s.latency["e2el"].at(50).value if "e2el" in s.latency else None
        if p50 is not None:
            out[s.block if s.block is not None else s.repeat] = p50
    return out


def tokens_per_request(lt: Report, rate: float) -> tuple[float | None, float | None]:
    """Mean (prompt, completion) tokens of the measured, successful requests offered at ``rate``,
    from the server's usage in the raw records: the token mix a price per token applies to."""
    recs = [r for s in loadtest.steps_of(lt) if s.offered_req_per_s == rate and s.records_file
            and Path(s.records_file).exists() for r in loadtest.read_records(s.records_file)
            if r.success and not r.warmup and r.completion_tokens]
    if not recs:
        return None, None
    return (sum(r.prompt_tokens or 0 for r in recs) / len(recs),
            sum(r.completion_tokens for r in recs) / len(recs))


def arm_cost(variant: str, lt: Report, load: RateSummary, cfg: ReportConfig) -> stats.Estimate | None:
    """``report.prices[variant]`` per 1e6 output tokens at the arm's sustained SLO rate, or None
    without a price."""
    price = cfg.prices.get(variant)
    if price is None:
        return None
    tokens_in, tokens_out = tokens_per_request(lt, load.offered_req_per_s)
    return cost_per_million_output_tokens(price, sustained_rate(lt), tokens_in, tokens_out)


def candidate(variant: str, base_bytes: float | None, cfg: ReportConfig) -> tuple[Candidate, dict]:
    """A variant's evidence for the recommender, and what else its table row needs."""
    q, e, lt = _load("quantize", variant), _load("evaluate", variant), _load("loadtest", variant)
    unquantized = variant == variants.BASE  # prepare's folder: no quantize report, its size from prepare's
    c = Candidate(variant=variant, bytes=base_bytes if unquantized else (q and q.metrics.get("model_bytes")),
                  broken=bool(q and q.metrics.get("broken")))
    extra: dict = {"method": "reference" if unquantized else (QuantizeDetails.of(q).method if q else None)}
    ed = EvaluateDetails.of(e) if e is not None else None
    if ed is not None and ed.evaluated:
        c.evaluated = True
        samples = Path(e.outputs.get("samples", ""))
        if samples.is_dir():
            for s in SUITES:
                with contextlib.suppress(FileNotFoundError):
                    c.questions[s] = evaluate.question_records(samples, s)
            with contextlib.suppress(FileNotFoundError):
                c.documents = {d: Document(*rec) for d, rec in evaluate.document_records(samples).items()}
        for s in SUITES:
            if c.questions.get(s):
                rec = c.questions[s]
                c.accuracy[s] = stats.proportion(sum(rec.values()), len(rec))
        if c.documents:
            ll, words, pages = zip(*c.documents.values())
            c.ppl = stats.perplexity(ll, words, clusters=pages)
        elif e.metrics.get("ppl_word") is not None:
            c.ppl = stats.Estimate(value=e.metrics["ppl_word"], n=0, note="no per-document records")
        extra["backend"] = ed.backend.name if ed.backend else None
    ld = ArmDetails.of(lt) if lt is not None else None
    if ld is not None and ld.rates:
        rates = ld.rates
        c.load = at_rate(rates, cfg.target_rate_req_per_s)
        c.e2el_ms = latencies_at(lt, c.load.offered_req_per_s)["e2el"]
        c.e2el_blocks = e2el_blocks_at(lt, c.load.offered_req_per_s)
        c.cost = arm_cost(variant, lt, c.load, cfg)
        if c.cost is not None:
            c.cost_currency = cfg.prices[variant].currency
            extra["cost"] = c.cost
        extra["rates"] = rates
        extra["tpot_low_load"] = min(rates, key=lambda r: r.offered_req_per_s).latency["tpot"].at(50)
        extra["knee"] = ld.knee
    elif ld is not None:
        extra["load_note"] = ld.not_servable
    return c, extra


def quant_row(c: Candidate, extra: dict, ref: Candidate | None, base_bytes: float | None) -> QuantRow:
    """One row of the quantization table; ``ref`` is the baseline's evidence (None: no comparisons)."""
    other = ref is not None and c is not ref
    return QuantRow(
        variant=c.variant, method=extra.get("method"), bytes=c.bytes,
        compression=base_bytes / c.bytes if base_bytes and c.bytes else None, broken=c.broken,
        tpot_ms_p50_low_load=extra.get("tpot_low_load"), ppl_word=c.ppl, backend=extra.get("backend"),
        ppl_change_vs_base=ppl_change(c, ref) if other else None,
        **{f"{s}_acc": c.accuracy.get(s) for s in SUITES},
        **{f"{s}_vs_base": accuracy_diff(c, ref, s) if other else None for s in SUITES},
        sustained_req_per_s=extra.get("knee"),
        cost_per_million_output_tokens=extra.get("cost"))  # report.prices, at the sustained rate
