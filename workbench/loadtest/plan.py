"""The load plan: which arm runs at which load next, from what was measured so far. Pure: no
server, no clock, no I/O, so every plan is tested without one (tests/test_loadtest_plan.py).

    plan = make_plan(cfg, ["base", "awq-int4"])
    while (block := plan.next_block()) is not None:        # every live arm once, in a seeded order
        for spec in block:
            plan.observe(spec, Outcome(verdict=..., steady=...))   # from the measured step
    plan.knees()                                            # knee mode: each arm's bracket

Three modes (``loadtest.mode``), after guidellm's profiles:

- ``sweep``: every offered rate of ``rates``, ``repeats`` times (open loop);
- ``concurrency``: closed loop at each of ``concurrencies`` (1 ... N requests in flight), ``repeats`` times;
- ``knee``: each arm's ``KneeSearch`` (loadgen/knee.py) advances one probe per block.

**Counterbalancing.** Steps run in blocks: a block is every live arm once at one load point (in
knee mode, each arm at its own next probe). The order inside a block is ``order``: ``randomized``
(a permutation per block drawn from ``(seed, block)``; the default), ``abba`` (the base order, then
reversed: A B, B A, A B ...) or ``fixed``. A drift of the host then falls on every arm alike on
average, and comparisons between arms are paired within blocks (report.py).

**Steady state decides the knee.** A step whose backlog grew (``steady`` False: arrivals outran
completions, or in-flight requests trended up) is not sustainable: a fail, whatever its SLO said.
A step too short to tell (``steady`` None) counts as undecided, so the search measures that rate
again (its requests pooled) and, still undecided after ``knee.max_repeats``, takes it as the upper
end marked undecided; a failed SLO stays a fail, because latency only grows while a queue builds.
A pass needs a step that reached steady state.

**Rate caps.** A URL arm's ``max_rate_req_per_s`` (a hosted API's limit or bill) keeps it out of
any block whose offered rate is above the cap: its sweep stops there; its knee search, asked for a
rate above the cap, ends with the bracket it has and a note naming the cap. Closed-loop points
(concurrency mode) have no offered rate and are not capped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workbench.config import LoadtestConfig
from workbench.loadgen.knee import KneeResult, KneeSearch
from workbench.stats import Verdict


@dataclass(frozen=True)
class Point:
    """One load point: an offered rate (open loop), or a concurrency (closed loop; rate inf)."""

    rate: float
    concurrency: int | None = None

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"conc_{self.concurrency}"
        return "rate_inf" if math.isinf(self.rate) else f"rate_{self.rate:g}"


@dataclass(frozen=True)
class StepSpec:
    """One step to measure. ``index`` seeds its requests (every arm at one (index, repeat) gets the
    same prompts at the same offsets); ``block`` is its counterbalanced block."""

    arm: str
    point: Point
    index: int
    repeat: int
    block: int
    role: str = "measure"  # measure | knee | low-load

    @property
    def label(self) -> str:
        return self.point.label + (f"-r{self.repeat}" if self.repeat else "")


@dataclass(frozen=True)
class Outcome:
    """What the plan learns from a measured step: the SLO verdict at its point (pooled over its
    repeats so far), whether it reached steady state (None: too short to tell), its goodput."""

    verdict: Verdict
    steady: bool | None = True
    goodput_fraction: float = 1.0


def effective_verdict(outcome: Outcome) -> Verdict:
    """The SLO verdict as far as steady state lets it stand (module docstring)."""
    if outcome.steady is False:
        return Verdict.failed
    if outcome.steady is None and outcome.verdict is Verdict.passed:
        return Verdict.undecided
    return outcome.verdict


def block_order(arms: list[str], block: int, seed: int, order: str) -> list[str]:
    """The arms' order inside ``block``: a seeded permutation per block, ABBA, or fixed."""
    if order == "fixed" or len(arms) < 2:
        return list(arms)
    if order == "abba":
        return list(arms) if block % 2 == 0 else list(reversed(arms))
    perm = np.random.default_rng([seed, 7919, block]).permutation(len(arms))  # 7919: apart from step seeds
    return [arms[i] for i in perm]


class Plan:
    """The shared part: blocks numbered in order, the arms' base order, the stop."""

    def __init__(self, cfg: LoadtestConfig, arms: list[str]):
        self.cfg, self.arms = cfg, list(arms)
        self.caps = rate_caps(cfg)
        self.blocks = 0
        self.stopped: str | None = None
        self.issued: dict[tuple[str, Point], int] = {}  # steps issued per (arm, point): the repeat index

    def _block(self, wanted: list[tuple[str, Point, int, str]]) -> list[StepSpec]:
        """A block of (arm, point, index, role), ordered; repeats counted per (arm, point)."""
        by_arm = {w[0]: w for w in wanted}
        out = []
        for arm in block_order([a for a in self.arms if a in by_arm], self.blocks, self.cfg.seed, self.cfg.order):
            _, point, index, role = by_arm[arm]
            repeat = self.issued.get((arm, point), 0)
            self.issued[(arm, point)] = repeat + 1
            out.append(StepSpec(arm, point, index, repeat, self.blocks, role))
        self.blocks += 1
        return out

    def stop(self, reason: str) -> None:
        """No new block (the time budget ran out); a knee search ends with the bracket it has."""
        self.stopped = self.stopped or reason

    def observe(self, spec: StepSpec, outcome: Outcome) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def next_block(self) -> list[StepSpec] | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def knees(self) -> dict[str, KneeResult]:
        return {}


class SweepPlan(Plan):
    """Every point, ``repeats`` times, point by point inside a repeat (rates, or concurrencies).
    An arm whose goodput fell below ``stop_below_goodput`` skips its higher points."""

    def __init__(self, cfg: LoadtestConfig, arms: list[str], points: list[Point]):
        super().__init__(cfg, arms)
        self.points = points
        self.cursor = 0  # over (repeat, index)
        self.saturated: dict[str, int] = {}  # arm -> index of the point it fell below the goodput floor

    def next_block(self) -> list[StepSpec] | None:
        while not self.stopped and self.cursor < self.cfg.repeats * len(self.points):
            index = self.cursor % len(self.points)
            self.cursor += 1
            point = self.points[index]
            live = [a for a in self.arms if index <= self.saturated.get(a, math.inf)
                    and (point.concurrency is not None or point.rate <= self.caps.get(a, math.inf))]
            if live:
                role = "measure"
                return self._block([(a, point, index, role) for a in live])
        return None

    def observe(self, spec: StepSpec, outcome: Outcome) -> None:
        floor = self.cfg.stop_below_goodput
        if floor is not None and outcome.goodput_fraction < floor:
            self.saturated[spec.arm] = min(self.saturated.get(spec.arm, math.inf), spec.index)


class KneePlan(Plan):
    """Each arm's knee search, one probe per arm per block. With ``knee.low_load_req_per_s``, also
    ``repeats`` low-load blocks (decode speed beside the knee, and the control's drift): the first
    before the searches, the others spread over the run (one every ``ceil(max_probes / repeats)``
    probe blocks; any still due when the searches end, at the end)."""

    def __init__(self, cfg: LoadtestConfig, arms: list[str]):
        super().__init__(cfg, arms)
        self.searches = {a: KneeSearch(cfg.knee) for a in arms}
        self.low_left = cfg.repeats if cfg.knee.low_load_req_per_s is not None else 0
        self.gap = max(1, math.ceil(cfg.knee.max_probes / cfg.repeats))
        self.since_low: int | None = None  # probe blocks since the last low-load block

    def next_block(self) -> list[StepSpec] | None:
        if self.stopped:
            for search in self.searches.values():
                search.stop(self.stopped)
            return None
        for a, search in self.searches.items():
            rate = search.next_rate()
            if rate is not None and rate > self.caps.get(a, math.inf):
                search.stop(f"the arm's rate cap (max_rate_req_per_s {self.caps[a]:g}) is below the "
                            f"next probe, {rate:.3g} req/s")
        wanted = [(a, Point(rate), 0, "knee") for a, s in self.searches.items()
                  if (rate := s.next_rate()) is not None]
        if self.low_left and (self.since_low is None or self.since_low >= self.gap or not wanted):
            self.low_left -= 1
            self.since_low = 0
            low = Point(self.cfg.knee.low_load_req_per_s)
            return self._block([(a, low, 0, "low-load") for a in self.arms if low.rate <= self.caps.get(a, math.inf)])
        if not wanted:
            return None
        self.since_low = (self.since_low or 0) + 1
        return self._block(wanted)

    def observe(self, spec: StepSpec, outcome: Outcome) -> None:
        if spec.role == "knee":
            self.searches[spec.arm].observe(spec.point.rate, effective_verdict(outcome))

    def knees(self) -> dict[str, KneeResult]:
        return {a: s.result() for a, s in self.searches.items()}


def rate_caps(cfg: LoadtestConfig) -> dict[str, float]:
    """{arm: the highest offered rate (req/s) it may be sent}, for the arms that have a cap."""
    return {a.name: a.max_rate_req_per_s for a in cfg.arms
            if getattr(a, "max_rate_req_per_s", None) is not None}


def points(cfg: LoadtestConfig) -> list[Point]:
    """The sweep's load points: each rate, or each concurrency (closed loop)."""
    if cfg.mode == "concurrency":
        return [Point(math.inf, c) for c in cfg.concurrencies]
    return [Point(r) for r in cfg.rates]


def make_plan(cfg: LoadtestConfig, arms: list[str]) -> Plan:
    """The plan ``cfg.mode`` asks for, over ``arms`` (names, in their base order)."""
    if cfg.mode == "knee":
        return KneePlan(cfg, arms)
    return SweepPlan(cfg, arms, points(cfg))
