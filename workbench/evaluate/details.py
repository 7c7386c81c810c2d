"""The evaluate report's typed ``details`` (reports/evaluate/<variant>.json): what the stage
writes and what the report stage and notebooks read. Its JSON Schema is docs/schemas/evaluate.json
(``python -m workbench.schemas``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from workbench import stats
from workbench.reports import Details, Report


class BackendInfo(BaseModel):
    """How lm-eval reached the model: ``name`` is the backend (``none``: not evaluated); the rest
    is what the backend reports of itself (lm-eval model, arguments, vLLM version, ...)."""

    model_config = ConfigDict(extra="allow")

    name: str
    lm_eval_model: str | None = None
    model_args: dict[str, Any] | str | None = None
    batch_size: int | str | None = None


class VsBaseline(BaseModel):
    """This variant against ``evaluate.baseline``, on the suites both read the same data for."""

    model_config = ConfigDict(extra="forbid")

    baseline: str
    baseline_created_at: str | None = None
    deltas: dict[str, float] = {}  # flat (also in metrics): <metric>_delta, paired bounds and p
    not_comparable: list[str] = []  # suites whose data differ from the baseline's
    paired: dict[str, stats.Comparison] = {}  # suite -> paired comparison on the same units
    not_paired: dict[str, str] = {}  # suite -> why it was not compared unit by unit


class EvaluateDetails(Details):
    """``details`` of an evaluate report. ``not_evaluated`` set: the variant was not scored (not
    listed, or nothing could load it here) and ``suites`` is empty."""

    backend: BackendInfo | None = None  # always written by the stage
    backend_fallback: dict[str, Any] | None = None  # from / to / reason (/ error) when vLLM could not
    # suite -> lm-eval's parsed numbers with intervals and the data they came from (overall,
    # categories, subjects for a multiple-choice suite; ppl_word, ppl_word_ci, pages for perplexity;
    # not_available when a backend cannot score it). Free-form for now: read by the notebooks.
    suites: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}  # seconds per phase
    note: str | None = None
    vs_baseline: VsBaseline | None = None  # absent for the baseline itself
    not_evaluated: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.not_evaluated is None


class EvaluateReport(Report):
    """reports/evaluate/<variant>.json, typed."""

    details: EvaluateDetails
