"""Pure functions from raw records to per-step metrics, defined as ``vllm bench serve`` defines
them (vllm/benchmarks/serve.py ``calculate_metrics``); units are in every name.

- TTFT = first token chunk - send. vLLM's client counts the first event with non-empty
  ``choices``, which for chat is the role-only chunk (``content: ""``); we keep that definition
  (vLLM's server emits that chunk in the same engine step as the first token).
- ITL = the gaps between consecutive token chunks (so the role-chunk -> first-content gap is one).
- E2EL = last token chunk - send (vLLM's ``latency``: the usage event and [DONE] do not move it).
  Non-streamed requests: response read - send.
- TPOT = (E2EL - TTFT) / (output_tokens - 1), only for output_tokens > 1.
- output tokens = the server's ``usage.completion_tokens``; without usage, token chunks with text
  (vLLM would re-tokenize the text; we hold no tokenizer).
- Goodput (vLLM ``--goodput``): a successful request is good when every set SLO holds
  (TTFT, TPOT with 0 for one-token replies, E2EL); rate = good / duration. A non-streamed
  request shows its first token at the end, so its TTFT for the SLO is its E2EL.
- duration = last measured response - first measured scheduled arrival (vLLM: benchmark start to
  the last response); request/token throughput and goodput rate divide by it.
- Percentiles: numpy's default (linear), as vLLM. A metric with no samples is left out, not 0.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from workbench.config import SLOConfig
from workbench.loadgen import timestats
from workbench.loadgen.client import Record

PERCENTILES = (50, 90, 95, 99)


def ttft_s(r: Record) -> float | None:
    if not r.success or r.first_token_s is None or r.send_s is None:
        return None
    return r.first_token_s - r.send_s


def e2el_s(r: Record) -> float | None:
    if not r.success or r.send_s is None:
        return None
    if r.streamed and r.chunk_s:
        return r.chunk_s[-1] - r.send_s
    return None if r.end_s is None else r.end_s - r.send_s


def output_tokens(r: Record) -> int:
    if not r.success:
        return 0
    return r.completion_tokens or r.content_chunks


def tpot_s(r: Record) -> float | None:
    """(E2EL - TTFT) / (output_tokens - 1); None for one-token replies and non-streamed ones, and
    for a streamed reply whose tokens all came in the first token's chunk (coalesced by a proxy or
    a loaded host): its decode was not seen, and 0 would pull every TPOT figure down."""
    n, ttft, e2el = output_tokens(r), ttft_s(r), e2el_s(r)
    if n <= 1 or ttft is None or e2el is None or (r.chunk_s and r.chunk_s[-1] == r.first_token_s):
        return None
    return (e2el - ttft) / (n - 1)


def itl_s(r: Record) -> list[float]:
    if not r.success:
        return []
    return [b - a for a, b in zip(r.chunk_s, r.chunk_s[1:])]


def is_good(r: Record, slo: SLOConfig) -> bool:
    """vLLM's goodput test: every set SLO >= the request's value (TPOT 0 for one-token replies)."""
    if not r.success:
        return False
    e2el = e2el_s(r)
    ttft = ttft_s(r) if r.streamed else e2el
    checks = ((slo.ttft_ms, ttft), (slo.tpot_ms, tpot_s(r) or 0.0), (slo.e2el_ms, e2el))
    return all(value is not None and limit >= value * 1000 for limit, value in checks
               if limit is not None)


def distribution_ms(name: str, values_s: Iterable[float | None]) -> dict[str, float]:
    """{name_ms_mean, name_ms_p50, ..., name_ms_p99} over the values that exist."""
    arr = np.asarray([v for v in values_s if v is not None], dtype=float) * 1000
    if arr.size == 0:
        return {}
    out = {f"{name}_ms_mean": float(arr.mean())}
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES)):
        out[f"{name}_ms_p{p}"] = float(v)
    return out


def rate_of(times: list[float]) -> float | None:
    """Events per second over a sorted series' span: (n - 1) / (last - first)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def errors_by_kind(records: list[Record]) -> dict[str, int]:
    return dict(Counter(r.error for r in records if not r.success and r.error))


def peak_concurrency(records: list[Record]) -> int:
    events = [(r.send_s, 1) for r in records if r.send_s is not None and r.end_s is not None]
    events += [(r.end_s, -1) for r in records if r.send_s is not None and r.end_s is not None]
    level = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        level += d
        peak = max(peak, level)
    return peak


def step_metrics(records: list[Record], offered_req_per_s: float, slo: SLOConfig) -> dict[str, float]:
    """Every number of one step, warm-up records excluded. Keys carry their units."""
    rs = [r for r in records if not r.warmup]
    ok = [r for r in rs if r.success]
    out: dict[str, float] = {
        "requests": float(len(rs)), "completed": float(len(ok)), "failed": float(len(rs) - len(ok)),
        "offered_req_per_s": float(offered_req_per_s),
    }
    scheduled = sorted(r.scheduled_s for r in rs)
    sent = sorted(r.send_s for r in rs if r.send_s is not None)
    for key, value in (("scheduled_req_per_s", rate_of(scheduled)), ("achieved_req_per_s", rate_of(sent))):
        if value is not None:
            out[key] = value
    if "scheduled_req_per_s" in out and "achieved_req_per_s" in out:
        out["achieved_over_scheduled"] = out["achieved_req_per_s"] / out["scheduled_req_per_s"]
    ends = [r.end_s for r in rs if r.end_s is not None]
    if rs and ends:
        duration = max(ends) - scheduled[0]
        out["duration_s"] = duration
        if duration > 0:
            n_out = sum(output_tokens(r) for r in ok)
            n_in = sum(r.prompt_tokens or 0 for r in ok)
            out["request_throughput_req_per_s"] = len(ok) / duration
            out["output_tokens_per_s"] = n_out / duration
            out["total_tokens_per_s"] = (n_in + n_out) / duration
            out["goodput_req_per_s"] = sum(is_good(r, slo) for r in rs) / duration
    if rs:
        out["goodput_fraction"] = sum(is_good(r, slo) for r in rs) / len(rs)
        out["success_fraction"] = len(ok) / len(rs)
    lags = [r.send_s - r.scheduled_s for r in rs if r.send_s is not None]
    if lags:
        out.update(distribution_ms("send_lag", lags))
        out["send_lag_ms_max"] = max(lags) * 1000
    out.update(distribution_ms("ttft", (ttft_s(r) for r in ok)))
    out.update(distribution_ms("tpot", (tpot_s(r) for r in ok)))
    out.update(distribution_ms("itl", (g for r in ok for g in itl_s(r))))
    out.update(distribution_ms("e2el", (e2el_s(r) for r in ok)))
    by_send = sorted((r for r in ok if r.send_s is not None), key=lambda r: r.send_s)
    for name, fn in (("ttft", ttft_s), ("e2el", e2el_s)):
        # batch means over the requests in send order: they share a queue, so not one request
        # but a batch of consecutive ones is the unit (timestats.mean)
        est = timestats.mean([v * 1000 for v in map(fn, by_send) if v is not None])
        if est.lo is not None:
            out[f"{name}_ms_mean_ci_lo"], out[f"{name}_ms_mean_ci_hi"] = est.lo, est.hi
    out["peak_concurrency"] = float(peak_concurrency(rs))
    for kind, n in errors_by_kind(rs).items():
        out[f"errors_{kind}"] = float(n)
    return out
