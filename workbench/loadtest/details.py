"""The load test's typed report ``details``: one arm's (reports/loadtest/<arm>.json) and the
compared run's own (reports/loadtest/all.json). JSON Schemas: docs/schemas/loadtest.json and
loadtest-all.json (``python -m workbench.schemas``)."""

from __future__ import annotations

from typing import Any

from workbench.loadgen.knee import KneeResult
from workbench.loadgen.summary import RateSummary, StepSummary
from workbench.reports import Details, Report


class ArmDetails(Details):
    """One arm: its measured steps and their summary per offered rate (raw records: ``outputs``).
    ``not_servable`` set: its server did not come up here, and there are no steps."""

    server: dict[str, Any] = {}  # how it was served (managed vLLM's config and start, or the URL)
    run: str | None = None  # the run id every arm of one load test shares
    steps: list[StepSummary] = []
    rates: list[RateSummary] = []  # the steps pooled per load point (repeats and blocks)
    knee: KneeResult | None = None  # the sustained rate at the SLO, when the plan searched for it
    step_metrics: dict[str, dict[str, Any]] = {}  # step label -> its flat metrics (MLflow child runs)
    time_budget_stopped: str | None = None  # why the run stopped early, if it did
    not_servable: str | None = None
    table: list[dict[str, Any]] = []  # empty; written by not-servable reports since 2026-11


class ComparedDetails(Details):
    """The compared run (variant ``all``): the order the steps ran in, the drift control, the arms
    paired within blocks, gateway arms against their direct ones."""

    run: str | None = None
    variants: list[str] = []
    arms: list[str] = []
    not_servable: list[str] = []
    design: dict[str, Any] | None = None  # order, seed, control, blocks (absent before 2026-12-03)
    order: list[dict[str, Any]] = []
    drift: dict[str, Any] | None = None  # control, points, verdict, drifted (loadtest/compare.py)
    paired: dict[str, Any] | None = None
    gateway: dict[str, Any] = {}  # "<variant>@gateway" -> its comparison with the direct arm
    time_budget: dict[str, Any] | None = None
    reports: dict[str, str] = {}  # arm -> its report's path
    rate_caps: dict[str, float] = {}  # a URL arm's max_rate_req_per_s: rates above it are not sent

    @property
    def drifted(self) -> bool:
        """Whether the control moved beyond its tolerance over the run (an older report kept the
        verdict under ``drift.spread``)."""
        d = self.drift or {}
        return bool(d.get("drifted") or (d.get("spread") or {}).get("drifted"))


class LoadtestReport(Report):
    """reports/loadtest/<arm>.json, typed."""

    details: ArmDetails


class LoadtestComparedReport(Report):
    """reports/loadtest/all.json, typed."""

    details: ComparedDetails
