"""workbench.loadgen.timestats against known cases: independent data (the per-request methods of
workbench.stats are then right, and the block methods must agree with them), AR(1) data (the
variance inflation has a closed form), hand-computed batch means, Cochran's Q and paired t
(scipy's ttest_rel); and summary.py's use of them (send order, steps pooled without blocks across
them, SLO verdicts from intervals). Issue 27, finding 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import signal
from scipy import stats as ss

from workbench import stats
from workbench.config import SLOConfig
from workbench.loadgen import summary
from workbench.loadgen import timecompare as tc
from workbench.loadgen import timestats as ts
from workbench.loadgen.client import Record
from workbench.stats import Verdict


def ar1(n: int, rho: float, seed: int) -> np.ndarray:
    """A stationary Gaussian AR(1) series of unit variance."""
    e = np.random.default_rng(seed).standard_normal(n + 500)
    return signal.lfilter([math.sqrt(1 - rho**2)], [1, -rho], e)[500:]


def median_indicator_tau(rho: float) -> float:
    """τ of 1{z_t <= 0} for Gaussian AR(1): lag-k correlation (2/π) arcsin(ρ^k) (Sheppard)."""
    k = np.arange(1, 2000)
    return float(1 + 2 * np.sum(2 / np.pi * np.arcsin(rho**k)))


# --- the variance inflation --------------------------------------------------------------------

def test_tau_is_one_for_independent_values_and_the_ar1_value_for_ar1():
    iid = np.random.default_rng(1).standard_normal(40_000)
    assert ts.tau(iid, 40) == pytest.approx(1.0, abs=0.1)
    x = ar1(40_000, 0.5, 2)  # τ = (1 + ρ) / (1 - ρ) = 3 for the mean of AR(1)
    assert ts.tau(x, 100) == pytest.approx(3.0, rel=0.12)


def test_closed_form_tau_is_the_circular_block_bootstraps_variance():
    x = ar1(600, 0.6, 3)
    l = 20  # 600 = 30 blocks: the resampled series is exactly n long
    lo, hi = ts.circular_block_bootstrap(x, lambda a: a.mean(axis=1), l, resamples=20_000, seed=4)
    # tau() carries n / (n - l) for the centring; the bootstrap's own variance does not
    var_boot = ts.tau(x, l) * x.var() / x.size * (x.size - l) / x.size
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(var_boot), rel=0.06)


def test_block_length_grows_with_autocorrelation_and_is_one_for_short_or_independent_series():
    assert ts.block_length(np.random.default_rng(5).standard_normal(20)) == 1  # < MIN_SERIES
    assert ts.block_length(np.arange(10.0)) == 1
    l0, l5, l8 = (ts.block_length(x, rho=r) for x, r in ((np.zeros(400), 0.0), (np.zeros(400), 0.5),
                                                             (np.zeros(400), 0.8)))
    assert l0 == 1 < l5 < l8 <= 400 // ts.MIN_BLOCKS


# --- a percentile --------------------------------------------------------------------------------

def test_percentile_on_independent_data_agrees_with_the_order_statistic_interval():
    x = np.random.default_rng(6).lognormal(0, 0.5, 2000)
    for p in (50, 99):
        old, new = stats.percentile(x, p), ts.percentile(x, p)
        assert new.value == pytest.approx(old.value)
        width = old.hi - old.lo
        assert abs(new.lo - old.lo) <= 0.25 * width and abs(new.hi - old.hi) <= 0.25 * width


def test_percentile_with_tau_one_is_exactly_the_order_statistic_interval():
    x = np.random.default_rng(7).standard_normal(500)
    s = np.sort(x)
    for p in (50, 90, 99):
        old = stats.percentile(x, p)
        new = ts._order_interval(s, p, x.size, 1.0, 0.95, old.value, "m")
        assert (new.lo, new.hi) == (old.lo, old.hi)


def test_percentile_on_ar1_is_wider_by_about_the_square_root_of_tau():
    x = np.exp(0.5 * ar1(8000, 0.8, 8))
    old, new = stats.percentile(x, 50), ts.percentile(x, 50)
    expect = math.sqrt(median_indicator_tau(0.8))  # ≈ 2.3
    ratio = (new.hi - new.lo) / (old.hi - old.lo)
    assert 0.75 * expect <= ratio <= 1.35 * expect
    assert "circular block bootstrap" in new.method


def test_p99_of_few_effective_requests_has_no_upper_bound_and_says_so():
    x = np.exp(0.5 * ar1(400, 0.8, 9))
    e = ts.percentile(x, 99)
    assert stats.percentile(x, 99).hi is not None  # 400 independent requests would bound it
    assert e.hi is None and "effective" in e.note


def test_percentile_counts_inf_as_above_everything_and_segments_must_add_up():
    x = np.array([1.0, 2.0, np.inf, 3.0] * 10)
    assert ts.percentile(x, 90).value == math.inf
    with pytest.raises(ValueError, match="segments sum to 39"):
        ts.percentile(x, 50, segments=[20, 19])


# --- a share and a mean --------------------------------------------------------------------------

def test_share_of_independent_flags_agrees_with_wilson():
    f = np.random.default_rng(10).random(2000) < 0.9
    old, new = stats.proportion(int(f.sum()), f.size), ts.share(f)
    assert new.value == old.value
    assert new.lo == pytest.approx(old.lo, abs=0.006) and new.hi == pytest.approx(old.hi, abs=0.006)


def test_all_good_flags_take_their_dependence_from_the_latency_behind_them():
    lat = np.exp(0.5 * ar1(400, 0.8, 11))
    flags = np.ones(400, bool)
    iid, dep = ts.share(flags), ts.share(flags, proxy=lat)
    assert dep.hi == 1.0 and dep.lo < iid.lo - 0.02  # an autocorrelated step knows less


def test_mean_is_batch_means_t_on_a_hand_computed_case():
    x = np.repeat(np.arange(1.0, 11.0), 10)  # 10 batches of 10, batch means 1..10
    e = ts.mean(x)
    half = ss.t.ppf(0.975, 9) * np.std(np.arange(1.0, 11.0), ddof=1) / math.sqrt(10)
    assert e.value == 5.5 and e.lo == pytest.approx(5.5 - half) and e.hi == pytest.approx(5.5 + half)
    assert e.method == "batch means t (10 batches)"


# --- SLO tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi, limit, verdict", [
    (10, 20, 25, Verdict.passed), (10, 20, 20, Verdict.passed), (30, 40, 25, Verdict.failed),
    (10, 40, 25, Verdict.undecided), (10, None, 25, Verdict.undecided), (None, 20, 15, Verdict.undecided)])
def test_within_passes_only_when_the_whole_interval_is_under_the_limit(lo, hi, limit, verdict):
    assert ts.within(stats.Estimate(value=15, lo=lo, hi=hi), limit) is verdict


@pytest.mark.parametrize("lo, hi, floor, verdict", [
    (0.95, 1.0, 0.9, Verdict.passed), (0.5, 0.8, 0.9, Verdict.failed), (0.85, 0.95, 0.9, Verdict.undecided)])
def test_at_least_passes_only_when_the_whole_interval_is_over_the_floor(lo, hi, floor, verdict):
    assert ts.at_least(stats.Estimate(value=0.9, lo=lo, hi=hi), floor) is verdict


def _cols(ttft_ms: np.ndarray) -> summary.Columns:
    recs = [Record(f"r{i}", "s", False, float(i), send_s=float(i), first_token_s=i + t / 1000,
                   chunk_s=[i + t / 1000, i + t / 1000 + 0.01], end_s=i + t / 1000 + 0.01, completion_tokens=2,
                   success=True, streamed=True) for i, t in enumerate(ttft_ms)]
    return summary.columns(recs, SLOConfig(ttft_ms=300, ttft_percentile=99, min_goodput=0.5))


def test_autocorrelated_requests_do_not_pass_a_p99_slo_that_independent_ones_pass():
    # finding 2: 400 requests all under the limit pass the binomial test as if independent;
    # in a series with lag-1 0.8 they hold too few effective samples to show a p99
    ttft = 100 * np.exp(0.3 * ar1(400, 0.8, 12))
    assert ttft.max() < 300
    slo = SLOConfig(ttft_ms=300, ttft_percentile=99, min_goodput=0.5)
    dep = _cols(ttft)
    assert stats.quantile_within(dep.slo_ttft_ms, 300, 99) is Verdict.passed  # the old test
    assert summary.slo_verdict(dep, slo).ttft is Verdict.undecided
    shuffled = _cols(np.random.default_rng(13).permutation(ttft))
    assert summary.slo_verdict(shuffled, slo).ttft is Verdict.passed


# --- send order and pooling ------------------------------------------------------------------------

def test_columns_keep_send_order_whatever_order_the_records_come_in():
    ttft = [5.0, 1.0, 4.0, 2.0, 3.0]
    recs = [Record(f"r{i}", "s", False, float(i), send_s=float(i), first_token_s=i + t / 1000,
                   chunk_s=[i + t / 1000], end_s=i + t / 1000, completion_tokens=1, success=True, streamed=True)
            for i, t in enumerate(ttft)]
    cols = summary.columns(list(reversed(recs)), SLOConfig())
    assert cols.ttft_ms == pytest.approx(ttft)


def test_pooled_steps_keep_their_boundaries_for_the_blocks():
    a, b = _cols(np.full(40, 50.0)), _cols(np.full(30, 60.0))
    pooled = a + b
    assert pooled.seg("ttft") == [40, 30] and pooled.seg("n") == [40, 30] and pooled.n == 70
    assert pooled.good_flags.size == 70 and pooled.slo_ttft_ms.size == 70


def test_rate_over_three_repeats_covers_the_spread_between_repeats():
    slo = SLOConfig(ttft_ms=10_000, ttft_percentile=99, min_goodput=0.5)
    cols, steps = {}, []
    for r, level in enumerate((50.0, 80.0, 65.0)):  # the host moved between repeats
        c = _cols(level * np.exp(0.05 * np.random.default_rng(r).standard_normal(60)))
        cols[r] = c
        steps.append(summary.step_summary("v", f"rate_1-r{r}", 1.0, [], slo, {}, cols=c, repeat=r, position=r))
    rate = summary.rate_summaries(steps, cols, slo)[0]
    p50 = rate.latency["ttft"].at(50)
    per = [s.latency["ttft"].at(50).value for s in steps]
    assert p50.lo < min(per) and p50.hi > max(per)  # pooled requests alone would be far narrower
    assert "t over 3 repeats" in p50.method


# --- arms and drift ------------------------------------------------------------------------------

def test_compare_arms_pairs_blocks_so_that_drift_cancels():
    drift = np.array([1.0, 1.6, 0.7, 1.3, 0.9])  # the host's level in each block
    b = 100 * drift * np.array([1.0, 1.01, 0.99, 1.0, 1.005])
    a = 1.1 * 100 * drift * np.array([1.005, 0.995, 1.0, 1.01, 0.99])
    paired, unpaired = tc.compare_arms(a, b), tc.compare_arms(a, b, paired=False)
    assert paired.significant and paired.diff.lo < 1.1 < paired.diff.hi and paired.diff.hi < 1.15
    assert paired.p_value == pytest.approx(ss.ttest_rel(np.log(a), np.log(b)).pvalue)
    assert not unpaired.significant  # drift swamps the difference when blocks are not paired


def _per_block(levels: dict[int, float]) -> dict[int, dict[str, stats.Estimate]]:
    """loadtest.compare's per-block medians: {block: {metric: median with a ±2 % interval}}."""
    return {b: {k: stats.Estimate(value=v, lo=v * 0.98, hi=v * 1.02) for k in ("ttft", "e2el")}
            for b, v in levels.items()}


def test_all_json_compares_arms_paired_by_block_whatever_order_they_ran_in():
    from workbench.loadtest import compare

    drift = {0: 1.0, 1: 1.5, 2: 0.8}  # the host moved between blocks: both arms alike
    arm = _per_block({b: 110 * d for b, d in drift.items()})
    control = _per_block({b: 100 * d for b, d in reversed(list(drift.items()))})
    c = compare.compare_arms(arm, control)
    assert c["blocks"] == [0, 1, 2]
    assert c["ttft_over_control"]["value"] == pytest.approx(1.1, rel=1e-6)
    assert c["ttft_over_control"]["method"] == "t over blocks (paired t on block log-ratios)"


def test_drift_spread_flags_a_control_that_moved_beyond_noise_and_tolerance():
    tight = lambda v: (v, v * 0.98, v * 1.02)  # noqa: E731
    steady = tc.drift_spread(*zip(*[tight(v) for v in (100, 101, 99, 100)]))
    moved = tc.drift_spread(*zip(*[tight(v) for v in (100, 100, 130, 131)]))
    small = tc.drift_spread(*zip(*[tight(v) for v in (100, 100, 105, 105)]), tolerance=0.1)
    assert not steady.drifted and moved.drifted and moved.ratio_max_min == pytest.approx(1.31)
    assert small.p_value < 0.05 and not small.drifted  # real, but within the 10 % tolerance
    # Cochran's Q by hand: weights 1 / se², se from each interval
    y = np.log([100, 100, 130, 131])
    se = (np.log(1.02) - np.log(0.98)) / (2 * ss.norm.ppf(0.975))
    q = float(np.sum((y - y.mean()) ** 2) / se**2)
    assert moved.q == pytest.approx(q) and moved.sd_log.lo <= moved.sd_log.value <= moved.sd_log.hi


def test_noisy_blocks_do_not_count_as_drift():
    wide = [(v, v * 0.8, v * 1.25) for v in (100, 112, 95)]  # 12 % apart, each ±25 %
    assert not tc.drift_spread(*zip(*wide)).drifted


def test_all_json_drift_is_the_controls_spread_over_its_blocks():
    from workbench.loadtest import compare

    d = compare.drift_spread(_per_block({0: 50.0, 3: 50.0, 6: 80.0}))
    assert d["blocks"] == [0, 3, 6] and d["ttft"]["per_block_ms"] == [50.0, 50.0, 80.0]
    assert d["ttft"]["max_over_min"] == pytest.approx(1.6) and d["ttft"]["spread"]["drifted"]
    assert d["ttft"]["spread"]["blocks"] == 3


def test_ratio_of_two_estimates_is_a_z_test_on_logs():
    z = ss.norm.ppf(0.975)
    a = stats.Estimate(value=120, lo=120 * math.exp(-0.1 * z), hi=120 * math.exp(0.1 * z))
    b = stats.Estimate(value=100, lo=100 * math.exp(-0.1 * z), hi=100 * math.exp(0.1 * z))
    c = tc.ratio_of(a, b)
    s = math.hypot(0.1, 0.1)
    assert c.diff.value == pytest.approx(1.2)
    assert c.p_value == pytest.approx(2 * ss.norm.sf(math.log(1.2) / s))
    assert c.diff.lo == pytest.approx(1.2 * math.exp(-z * s))


def test_a_steady_autocorrelated_control_is_not_drift_where_mann_whitney_said_it_was():
    # finding 2: two steps of one steady process with lag-1 0.9 (seed chosen where the per-request
    # test fires; the new check, aware of ~20 effective samples a step, does not)
    x = 100 * np.exp(0.3 * ar1(800, 0.9, 14))
    start, end = _cols(x[:400]), _cols(x[400:])
    old = stats.compare_samples(end.ttft_ms, start.ttft_ms)
    assert old.significant and abs(old.diff.value - 1) > 0.1
    step = summary.step_summary("a", "rate_5", 5.0, [], SLOConfig(), {}, cols=start)
    assert not summary.drift_check(step, start, end).drifted


def test_a_p99_interval_over_ten_thousand_requests_is_vectorized():
    x = np.exp(0.5 * ar1(10_000, 0.6, 15))
    e = ts.percentile(x, 99)
    assert e.lo < e.value < e.hi  # (its time is measured in benchmarks/loadtest_stats.py)


def test_step_metrics_mean_interval_is_batch_means_over_send_order():
    from workbench.loadgen import metrics

    ttft = 100 * np.exp(0.3 * ar1(400, 0.8, 16))
    recs = [Record(f"r{i}", "s", False, float(i), send_s=float(i), first_token_s=i + t / 1000,
                   chunk_s=[i + t / 1000, i + t / 1000 + 0.01], end_s=i + t / 1000 + 0.01, completion_tokens=2,
                   success=True, streamed=True) for i, t in enumerate(ttft)]
    out = metrics.step_metrics(list(reversed(recs)), 1.0, SLOConfig())  # any record order: send order counts
    new = ts.mean(ttft)
    assert out["ttft_ms_mean_ci_lo"] == pytest.approx(new.lo) and out["ttft_ms_mean_ci_hi"] == pytest.approx(new.hi)
    old = stats.mean(ttft)
    assert new.hi - new.lo > 2 * (old.hi - old.lo)  # τ of AR(1) at 0.8 is ~9 for the mean


def test_knee_probe_looks_keep_the_false_pass_at_the_limit_within_five_percent():
    """A knee probe judged again on its pooled requests while undecided (up to 3 looks): with the
    true p99 exactly at the limit, a pass is a false pass. At summary.look_level's wider interval
    it stays <= 5 %; a one-sided 5 % test at every look (a 90 % interval: the old binomial test's
    level) lets more through, 5.9 % in this simulation (issue 28, finding 6)."""
    from workbench.loadgen import summary
    from workbench.stats import Verdict

    limit = float(np.exp(2.3263478740408408))  # lognormal(0, 1): its p99
    rng = np.random.default_rng(7)

    def false_passes(level: float, runs: int = 600, looks: int = 3, per_look: int = 600) -> float:
        passed = 0
        for _ in range(runs):
            x = np.empty(0)
            for _ in range(looks):
                x = np.concatenate([x, rng.lognormal(0, 1, per_look)])
                v = ts.within(ts.percentile(x, 99, level), limit)
                if v is not Verdict.undecided:
                    passed += v is Verdict.passed
                    break
        return passed / runs

    assert summary.look_level(1) == pytest.approx(0.95)
    assert summary.look_level(3) == pytest.approx(1 - 2 * 0.05 / 3)
    assert false_passes(summary.look_level(3), runs=2000) <= 0.05
    assert false_passes(0.90, runs=2000) > 0.05


def test_drift_spread_of_blocks_with_tiny_intervals_gives_an_interval_not_an_error():
    # two blocks whose medians differ far more than their intervals: the Q-profile's upper root
    # (chi2 with 1 df, lower quantile ~0.001) lies far above var(y), and brentq raised "f(a) and
    # f(b) must have different signs" in a load test's all.json
    vals = [31.2, 62.4]
    spread = tc.drift_spread(vals, [v * 0.99 for v in vals], [v * 1.01 for v in vals], tolerance=0.1)
    assert spread.drifted and spread.sd_log.hi is not None and spread.sd_log.hi > spread.sd_log.lo > 0
