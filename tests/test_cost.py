"""workbench/cost.py: an arm's cost per million output tokens, with the rate's interval carried."""

import math

import numpy as np
import pytest
from pydantic import ValidationError

from workbench.config import ConfigError, PriceConfig, load_params
from workbench.cost import cost_per_million_output_tokens, hourly_price
from workbench.stats import Estimate

GPU = PriceConfig(per_gpu_hour=2.0, gpus=2)
HOSTED = PriceConfig(per_million_input_tokens=0.5, per_million_output_tokens=1.5)


def rate(value, lo=None, hi=None, n=6):
    return Estimate(value=value, lo=lo, hi=hi, n=n, method="t")


def test_self_hosted_cost_is_the_hourly_price_over_the_tokens_sustained_in_an_hour():
    c = cost_per_million_output_tokens(GPU, rate(10, 8, 12), 256, 100)
    # 2 GPUs x 2/h = 4 per hour; 10 req/s x 100 tokens x 3600 s = 3.6e6 tokens per hour
    assert c.value == pytest.approx(4 / 3.6e6 * 1e6)
    assert c.lo == pytest.approx(4 / (12 * 100 * 3600) * 1e6)  # the fastest plausible rate: cheapest
    assert c.hi == pytest.approx(4 / (8 * 100 * 3600) * 1e6)
    assert c.n == 6 and c.level == 0.95 and "USD" in c.note
    assert hourly_price(GPU) == 4 and hourly_price(HOSTED) is None


def test_cost_interval_covers_whenever_the_rate_interval_covers():
    """A monotone map keeps coverage: every rate interval holding the true rate gives a cost
    interval holding the true cost, and one missing it gives one missing the cost."""
    rng = np.random.default_rng(0)
    true_rate, out = 7.3, 128
    true_cost = cost_per_million_output_tokens(GPU, rate(true_rate), 0, out).value
    for _ in range(500):
        lo, hi = sorted(rng.uniform(0.5, 15, 2))
        c = cost_per_million_output_tokens(GPU, rate((lo + hi) / 2, lo, hi), 0, out)
        assert (lo <= true_rate <= hi) == (c.lo <= true_cost <= c.hi)


def test_a_rate_not_bounded_away_from_zero_leaves_the_cost_unbounded_above():
    c = cost_per_million_output_tokens(GPU, rate(0.5, 0.0, 1.2), 64, 32)
    assert c.value is not None and c.hi is None and c.lo > 0
    assert cost_per_million_output_tokens(GPU, rate(0.5), 64, 32).lo == 0.0  # no interval: only cost >= 0


@pytest.mark.parametrize("value", [None, 0.0, float("nan"), -1.0])
def test_no_sustained_rate_gives_no_cost_with_the_reason_not_an_error(value):
    c = cost_per_million_output_tokens(GPU, rate(value), 64, 32)
    assert c.value is None and "no cost" in c.note


@pytest.mark.parametrize("tokens", [(64, 0), (64, float("nan")), (float("nan"), 32), (-1, 32)])
def test_bad_token_counts_give_no_cost_with_the_reason(tokens):
    c = cost_per_million_output_tokens(HOSTED, rate(3, 2, 4), *tokens)
    assert c.value is None and "tokens per request" in c.note


def test_hosted_cost_is_per_token_and_the_same_at_any_rate():
    slow = cost_per_million_output_tokens(HOSTED, rate(1, 0.5, 2), 256, 128)
    fast = cost_per_million_output_tokens(HOSTED, rate(100, 90, 110), 256, 128)
    assert slow.value == fast.value == pytest.approx(1.5 + 0.5 * 256 / 128)
    assert slow.lo == slow.hi == slow.value and "any rate" in slow.note


def test_a_price_is_one_kind_or_the_other():
    with pytest.raises(ValidationError, match="per_gpu_hour"):
        PriceConfig()
    with pytest.raises(ValidationError, match="both"):
        PriceConfig(per_million_input_tokens=1.0)
    with pytest.raises(ValidationError, match="not both"):
        PriceConfig(per_gpu_hour=1.0, per_million_input_tokens=1.0, per_million_output_tokens=1.0)
    assert GPU.kind == "self-hosted" and HOSTED.kind == "hosted"


def test_prices_in_params_are_typed_and_a_typo_names_the_arm(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("report:\n  prices:\n    base: {per_gpu_hour: 3.5}\n"
                 "    hosted: {per_million_input_tokens: 0.15, per_million_output_tokens: 0.6}\n")
    prices = load_params(p).report.prices
    assert prices["base"].kind == "self-hosted" and prices["hosted"].kind == "hosted"
    p.write_text("report:\n  prices:\n    hosted: {per_milion_output_tokens: 0.6}\n")
    with pytest.raises(ConfigError, match="report.prices.hosted.per_milion_output_tokens"):
        load_params(p)
    assert math.isfinite(cost_per_million_output_tokens(prices["base"], rate(2, 1, 3), 10, 10).value)
