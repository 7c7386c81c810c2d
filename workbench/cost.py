"""What an arm's output costs: price per million output tokens at its sustained rate, with the
interval carried from the rate's interval. Pure functions; ``config.PriceConfig`` holds the price.

    from workbench.cost import cost_per_million_output_tokens
    cost = cost_per_million_output_tokens(price, rate_req_per_s, input_tokens_per_request=256,
                                          output_tokens_per_request=128)
    cost.text(".3g", unit=" USD")         # "0.771 USD [0.701, 0.857]"

    python -m pytest tests/test_cost.py

A self-hosted arm pays ``per_gpu_hour x gpus`` for every hour, busy or not, so its cost per output
token is that hourly price over the output tokens it sustains in an hour::

    USD per 1e6 output tokens = per_gpu_hour * gpus / (rate_req_per_s * output_tokens_per_request * 3600) * 1e6

It falls as the rate rises, so the rate's interval [lo, hi] maps to the cost interval
[cost(hi), cost(lo)] (a monotone transform keeps the coverage: P(lo <= rate <= hi) is
P(cost(hi) <= cost <= cost(lo))). A rate whose lower bound is 0 or unknown leaves the cost
unbounded above (``hi`` None). A hosted arm pays per token whatever the rate::

    USD per 1e6 output tokens = per_million_output_tokens + per_million_input_tokens * input / output

(input and output tokens per request: the workload's, the same requests for every arm), so its
interval is a point and its note says so. The tokens per request are taken as known (every arm
serves the same requests); only the rate's sampling error is carried.
"""

from __future__ import annotations

import math

from workbench.config import PriceConfig
from workbench.stats import Estimate

SECONDS_PER_HOUR = 3600.0
PER_MILLION = 1e6


def _positive(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and x > 0 else None


def hourly_price(price: PriceConfig) -> float | None:
    """A self-hosted arm's price per hour (all its GPUs); None for a hosted arm."""
    return None if price.per_gpu_hour is None else price.per_gpu_hour * price.gpus


def cost_per_million_output_tokens(price: PriceConfig, rate_req_per_s: Estimate,
                                   input_tokens_per_request: float,
                                   output_tokens_per_request: float) -> Estimate:
    """The price of a million output tokens at the arm's sustained rate (requests per second, an
    ``Estimate`` with its interval), in ``price.currency``. A rate or token count that is missing,
    zero or not finite gives ``value`` None with the reason in ``note`` (the arm has no cost
    figure), never an exception."""
    out_tok, in_tok = output_tokens_per_request, input_tokens_per_request
    if not (_positive(out_tok) and in_tok is not None and math.isfinite(in_tok) and in_tok >= 0):
        return Estimate(value=None, method="cost", note=f"no cost: tokens per request in {in_tok!r}, "
                                                        f"out {out_tok!r} (need out > 0, in >= 0)")
    if price.kind == "hosted":
        per_m = price.per_million_output_tokens + price.per_million_input_tokens * in_tok / out_tok
        return Estimate(value=per_m, lo=per_m, hi=per_m, n=rate_req_per_s.n, level=rate_req_per_s.level,
                        method="cost: per-token price",
                        note=f"{price.currency}; hosted, paid per token: the same at any rate")

    hourly = hourly_price(price)

    def at(rate: float | None) -> float | None:
        rate = _positive(rate)
        return None if rate is None else hourly / (rate * out_tok * SECONDS_PER_HOUR) * PER_MILLION

    value = at(rate_req_per_s.value)
    if value is None:
        return Estimate(value=None, n=rate_req_per_s.n, level=rate_req_per_s.level, method="cost",
                        note=f"no cost: sustained rate {rate_req_per_s.value!r} req/s is not a positive number")
    # the highest plausible rate is the cheapest; a rate unbounded above bounds the cost only by 0
    lo = at(rate_req_per_s.hi) if rate_req_per_s.hi is not None else 0.0
    hi = at(rate_req_per_s.lo)  # None: the rate's lower bound is 0 or unknown -> no upper bound
    return Estimate(value=value, lo=lo, hi=hi, n=rate_req_per_s.n, level=rate_req_per_s.level,
                    method=f"cost: {price.currency} {hourly:g}/h over the rate's interval ({rate_req_per_s.method})",
                    note=f"{price.currency}; self-hosted, {price.gpus} GPU(s) at {price.per_gpu_hour:g}/h, "
                         "paid busy or idle")
