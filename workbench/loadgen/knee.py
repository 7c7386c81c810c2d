"""The knee search: the highest offered rate at which a configuration meets the SLO.

A state machine, so that the load test can interleave several configurations' searches (one
probe of each in turn) instead of running them one after another:

    search = KneeSearch(cfg.knee)
    while (rate := search.next_rate()) is not None:
        search.observe(rate, verdict_at(rate))     # stats.Verdict from the requests at that rate
    search.result()                                # sustained rate with its bracket

Bracket first (double from ``start_req_per_s`` while it passes, halve while it fails), then
bisect geometrically until [highest pass, lowest fail] is within +-tolerance. A pass counts only
when a binomial test on the requests supports it; an undecided probe is measured again (the
caller pools its requests) up to ``max_repeats`` times, then counts as a fail and is marked so.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from workbench.config import KneeConfig
from workbench.stats import Verdict


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: float
    verdict: Verdict  # the last verdict at this rate (pooled over its repeats)
    repeats: int


class KneeResult(BaseModel):
    """``sustained_req_per_s`` lies in [lo, hi]: lo passed the SLO (supported by the requests),
    hi did not. ``lo`` None: even the lowest rate tried failed; ``hi`` None: the highest passed."""

    model_config = ConfigDict(extra="forbid")

    sustained_req_per_s: float | None
    lo: float | None
    hi: float | None
    converged: bool
    hi_undecided: bool  # the upper end was undecided after max_repeats, not shown to fail
    tolerance: float
    probes: list[Probe]
    note: str

    def text(self) -> str:
        if self.lo is None and self.hi is None:
            return "not measured (no probe finished)"
        if self.lo is None:
            return f"< {self.hi:g} req/s (no rate tried passed)"
        hi = "∞" if self.hi is None else f"{self.hi:.3g}"
        unfinished = " (search not finished)" if self.note.startswith("not finished") else ""
        return f"{self.lo:.3g} req/s [{self.lo:.3g}, {hi}){unfinished}"


class KneeSearch:
    def __init__(self, cfg: KneeConfig):
        self.cfg = cfg
        self.lo: float | None = None  # highest rate shown to pass
        self.hi: float | None = None  # lowest rate that did not pass
        self.hi_undecided = False
        self.probes: list[Probe] = []
        self._next: float | None = cfg.start_req_per_s
        self._repeats = 0
        self._done_note = ""

    def _ratio_ok(self) -> bool:
        t = self.cfg.tolerance
        return self.lo is not None and self.hi is not None and self.hi / self.lo <= (1 + t) / (1 - t)

    def next_rate(self) -> float | None:
        return self._next

    def observe(self, rate: float, verdict: Verdict) -> None:
        if self._next is None or not math.isclose(rate, self._next):
            raise ValueError(f"observed {rate} req/s, but the search asked for {self._next}")
        self._repeats += 1
        if verdict is Verdict.undecided and self._repeats < self.cfg.max_repeats \
                and self._probes_used() < self.cfg.max_probes:
            return  # measure the same rate again; the caller pools the requests
        self.probes.append(Probe(rate=rate, verdict=verdict, repeats=self._repeats))
        self._repeats = 0
        if verdict is Verdict.passed:
            self.lo = rate if self.lo is None else max(self.lo, rate)
        elif self.hi is None or rate <= self.hi:
            self.hi = rate
            self.hi_undecided = verdict is Verdict.undecided
        self._next = self._choose()

    def stop(self, reason: str) -> None:
        """End the search before it converged (e.g. the load test's time budget ran out): its
        result keeps the bracket measured so far, and the note says why it stopped."""
        if self._next is not None:
            self._next = None
            self._repeats = 0  # an undecided probe's repeats so far count for nothing
            self._done_note = f"not finished: {reason}"

    def _probes_used(self) -> int:
        return sum(p.repeats for p in self.probes) + self._repeats

    def _choose(self) -> float | None:
        c = self.cfg
        if self._probes_used() >= c.max_probes:
            self._done_note = f"stopped after {c.max_probes} probes"
            return None
        if self._ratio_ok():
            self._done_note = f"bracket within +-{c.tolerance:.0%}"
            return None
        if self.hi is None:  # everything so far passed: go up
            nxt = self.lo * 2
            if self.lo >= c.max_req_per_s:
                self._done_note = f"passes at the highest allowed rate ({c.max_req_per_s:g} req/s)"
                return None
            return min(nxt, c.max_req_per_s)
        if self.lo is None:  # everything so far failed: go down
            if self.hi <= c.min_req_per_s:
                self._done_note = f"fails at the lowest allowed rate ({c.min_req_per_s:g} req/s)"
                return None
            return max(self.hi / 2, c.min_req_per_s)
        return math.sqrt(self.lo * self.hi)

    def result(self) -> KneeResult:
        converged = self._ratio_ok()
        note = self._done_note or "not finished"
        if self.hi_undecided:
            note += "; the upper end stayed undecided (counted as a fail: more requests per probe would settle it)"
        return KneeResult(sustained_req_per_s=self.lo, lo=self.lo, hi=self.hi, converged=converged,
                          hi_undecided=self.hi_undecided, tolerance=self.cfg.tolerance,
                          probes=list(self.probes), note=note)
