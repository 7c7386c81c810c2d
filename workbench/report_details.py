"""The report stage's typed ``details`` (reports/report/all.json): the quantization table's rows,
the load table, the recommendation (``recommend.Decision``) and what was missing. JSON Schema:
docs/schemas/report.json (``python -m workbench.schemas``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from workbench import stats, variants
from workbench.loadgen.knee import KneeResult
from workbench.loadgen.summary import RateSummary
from workbench.recommend import Decision
from workbench.reports import Details, Report


class QuantRow(BaseModel):
    """One variant's row of the quantization table. The ``*_vs_base`` fields compare it with the
    report's ``baseline`` (evaluate.baseline; "base" unless configured), whatever its name: field
    names are a public API, so they keep the name they shipped with."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    method: str | None = None  # quantization method; "reference" for base
    bytes: float | None = None  # size on disk
    compression: float | None = None  # base's bytes / this variant's
    broken: bool = False  # flagged by the quantize stage's perplexity check
    tpot_ms_p50_low_load: stats.Estimate | None = None  # decode speed at the lowest offered rate
    ppl_word: stats.Estimate | None = None
    backend: str | None = None  # how it was evaluated
    ppl_change_vs_base: stats.Comparison | None = None  # % change of word perplexity, paired
    mmlu_acc: stats.Estimate | None = None
    ceval_acc: stats.Estimate | None = None
    mmlu_vs_base: stats.Comparison | None = None  # accuracy difference, paired on the same questions
    ceval_vs_base: stats.Comparison | None = None
    sustained_req_per_s: KneeResult | None = None  # the load test's knee, when it searched for one
    cost_per_million_output_tokens: stats.Estimate | None = None  # report.prices at the sustained rate


class ArmPoint(BaseModel):
    """One arm (a variant, a llama.cpp or URL arm) as the quality / rate / cost picture shows it
    (``report_arms``): each figure with its interval, and in words what is missing and why.
    None: not measured for this arm (a speed-only arm has no quality; an arm without a price no cost)."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    engine: str | None = None  # how the load test reached it: vllm | llama.cpp | url (None: not load-tested)
    quality_metric: str  # report.accuracy_metric
    quality: stats.Estimate | None = None  # share correct, Wilson interval over the questions
    perplexity: stats.Estimate | None = None
    perplexity_note: str | None = None  # e.g. "not available from this API: ..." (evaluate's reason)
    sustained_req_per_s: stats.Estimate | None = None  # at the SLO: [highest rate passed, lowest failed)
    ceiling: str = ""  # the measured ceiling in words: bracket, what limited it, the cap
    rate_cap_req_per_s: float | None = None  # a URL arm's max_rate_req_per_s: rates above it not sent
    cost_per_million_output_tokens: stats.Estimate | None = None  # interval carried from the rate's
    cost_currency: str | None = None
    cost_note: str | None = None  # why there is no cost figure


class ReportDetails(Details):
    quantization_table: list[QuantRow]
    load_table: list[RateSummary]
    recommendation: Decision
    drift: dict[str, Any] | None = None  # the load test's drift control (loadtest all.json), as written there
    level: float = stats.LEVEL  # every interval's confidence level
    gateway: dict[str, Any] | None = None  # "<variant>@gateway" arms, shown, never candidates
    missing: dict[str, list[str]] = {}  # variant -> stages without a report for it
    # Every compared arm's quality, sustained rate and cost (the picture quality_rate_cost.png);
    # absent in reports written before 2026-12-06.
    arms: list[ArmPoint] = []
    # The variant the table compares with. Reports written before it was recorded compared with base.
    baseline: str | None = variants.BASE


class FinalReport(Report):
    """reports/report/all.json, typed."""

    details: ReportDetails
