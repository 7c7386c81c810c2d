"""A load test's raw records as arrays (milliseconds, in send order), extracted in one pass: what
every interval of ``summary`` is computed from, vectorized. Latencies as ``metrics`` defines them
(vLLM's definitions); the goodput count as ``metrics.is_good`` makes it."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from workbench.config import SLOConfig
from workbench.loadgen import metrics as m
from workbench.loadgen.client import Record

# Columns' arrays, in send order: one value per measured request ("n"), per request that has the
# latency, per token gap ("itl")
KINDS = {"n": "slo_ttft_ms", "ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms", "itl": "itl_ms"}


@dataclass
class Columns:
    """The measured requests of one or more steps as arrays (milliseconds), in send order (the
    block intervals need the time order): extracted from the records in one pass, so that every
    interval after it is vectorized (a report of 100,000 requests with 128 tokens each holds 12.7
    million ITL samples). ``segments`` counts each step's measured requests when steps are pooled."""

    ttft_ms: np.ndarray  # successful requests with a first token
    tpot_ms: np.ndarray  # successful requests of more than one token
    e2el_ms: np.ndarray
    itl_ms: np.ndarray  # every gap between token chunks, request after request
    slo_ttft_ms: np.ndarray  # every measured request: TTFT for the SLO test, inf for a failure
    good: int  # requests within every SLO (vLLM's goodput)
    ok: int
    n: int
    good_flags: np.ndarray | None = None  # every measured request: within every SLO
    ok_flags: np.ndarray | None = None
    segments: tuple[tuple[int, ...], ...] = ()  # per step: its length in each array of KINDS

    def __post_init__(self) -> None:
        if self.good_flags is None:
            self.good_flags = np.zeros(self.n, bool)
            self.good_flags[: self.good] = True
        if self.ok_flags is None:
            self.ok_flags = np.zeros(self.n, bool)
            self.ok_flags[: self.ok] = True
        if not self.segments:
            self.segments = (tuple(int(getattr(self, a).size) for a in KINDS.values()),)

    def __add__(self, other: "Columns") -> "Columns":
        cat = np.concatenate
        return Columns(cat([self.ttft_ms, other.ttft_ms]), cat([self.tpot_ms, other.tpot_ms]),
                       cat([self.e2el_ms, other.e2el_ms]), cat([self.itl_ms, other.itl_ms]),
                       cat([self.slo_ttft_ms, other.slo_ttft_ms]), self.good + other.good,
                       self.ok + other.ok, self.n + other.n, cat([self.good_flags, other.good_flags]),
                       cat([self.ok_flags, other.ok_flags]), self.segments + other.segments)

    def seg(self, kind: str) -> list[int]:
        """Each pooled step's length in the array of ``kind`` (a key of ``KINDS``)."""
        i = list(KINDS).index(kind)
        return [s[i] for s in self.segments]


def columns(records: list[Record], slo: SLOConfig) -> Columns:
    """Latencies as ``metrics`` defines them (vLLM's definitions), warm-up records excluded, and
    the goodput count as ``metrics.is_good`` makes it, over arrays, in send order (scheduled
    order for a request never sent)."""
    meas = sorted((r for r in records if not r.warmup),
                  key=lambda r: r.scheduled_s if r.send_s is None else r.send_s)
    okm = np.fromiter((r.success and r.send_s is not None for r in meas), bool, len(meas))
    ok = [r for r, o in zip(meas, okm) if o]
    k = len(ok)
    nan = np.nan
    send = np.fromiter((r.send_s for r in ok), float, k)
    first = np.fromiter((nan if r.first_token_s is None else r.first_token_s for r in ok), float, k)
    last = np.fromiter((r.chunk_s[-1] if r.streamed and r.chunk_s else (nan if r.end_s is None else r.end_s)
                        for r in ok), float, k)
    ntok = np.fromiter((m.output_tokens(r) for r in ok), float, k)
    streamed = np.fromiter((r.streamed for r in ok), bool, k)
    lens = np.fromiter((len(r.chunk_s) for r in ok), np.int64, k)
    flat = np.fromiter(chain.from_iterable(r.chunk_s for r in ok), float, int(lens.sum()))
    gaps = np.diff(flat)
    bounds = np.cumsum(lens)[:-1] - 1  # the gap from one request's last chunk to the next one's first
    gaps = np.delete(gaps, bounds[(bounds >= 0) & (bounds < gaps.size)])
    ttft, e2el = first - send, last - send
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where((ntok > 1) & (last != first), (e2el - ttft) / (ntok - 1), nan)  # see metrics.tpot_s
    # goodput: every set SLO holds; a non-streamed reply shows its first token at its end
    slo_ttft = np.where(streamed, ttft, e2el)
    good = np.ones(k, bool)
    for limit, value in ((slo.ttft_ms, slo_ttft), (slo.tpot_ms, np.where(np.isnan(tpot), 0.0, tpot)),
                         (slo.e2el_ms, e2el)):
        if limit is not None:
            good &= value * 1000 <= limit  # nan (no value) is never good
    good_all = np.zeros(len(meas), bool)
    good_all[okm] = good
    slo_all = np.full(len(meas), np.inf)  # a failed request never showed a first token
    slo_all[okm] = np.where(np.isnan(ttft), np.inf, ttft * 1000)
    return Columns(ttft_ms=ttft[~np.isnan(ttft)] * 1000, tpot_ms=tpot[~np.isnan(tpot)] * 1000,
                   e2el_ms=e2el[~np.isnan(e2el)] * 1000, itl_ms=gaps * 1000, slo_ttft_ms=slo_all,
                   good=int(good.sum()), ok=k, n=len(meas), good_flags=good_all, ok_flags=okm)
