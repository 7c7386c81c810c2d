import math

from workbench.promscrape import delta, delta_buckets, histogram_quantile, parse

BEFORE = """
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{model_name="m"} 2
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 1
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 1
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 1
vllm:time_to_first_token_seconds_count{model_name="m"} 1
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.05
"""
AFTER = BEFORE.replace("_total{model_name=\"m\"} 2", "_total{model_name=\"m\"} 5").replace(
    '{le="0.1",model_name="m"} 1', '{le="0.1",model_name="m"} 3').replace(
    '{le="0.5",model_name="m"} 1', '{le="0.5",model_name="m"} 11').replace(
    '{le="+Inf",model_name="m"} 1', '{le="+Inf",model_name="m"} 11')


def test_counter_delta_between_scrapes():
    assert delta(parse(BEFORE), parse(AFTER), "vllm:num_preemptions_total") == 3


def test_histogram_quantile_interpolates_within_bucket():
    buckets = delta_buckets(parse(BEFORE), parse(AFTER), "vllm:time_to_first_token_seconds")
    assert buckets == [(0.1, 2), (0.5, 10), (math.inf, 10)]
    # rank 5 of 10 lies in (0.1, 0.5], 3 of its 8 observations in: 0.1 + 0.4 * 3/8
    assert math.isclose(histogram_quantile(0.5, buckets), 0.25)


def test_absent_series_is_nan_not_zero():
    assert math.isnan(delta(parse(BEFORE), parse(AFTER), "vllm:nope"))
