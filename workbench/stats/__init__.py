"""Intervals, paired tests and verdicts: the statistics every reported figure goes through.

Pure functions over raw records (per-question correctness, per-document log-likelihoods,
per-request latencies). scipy does the statistics; this module chooses the method for each kind
of figure, and says so in the result:

- a share (accuracy, goodput, SLO attainment): Wilson score interval (``scipy.stats.binomtest``);
- a difference in accuracy on the same questions: Newcombe's method 10 interval for the paired
  difference, and the p-value that inverts it (significant exactly when the interval excludes 0);
- a percentile (TTFT, TPOT, ITL, E2EL): the distribution-free order-statistic interval, ranks from
  ``scipy.stats.binom`` (what ``scipy.stats.quantile_test`` computes, in one pass for several
  percentiles). Too few samples for an upper bound (a p99 needs 368 at 95 %) gives ``hi=None``:
  the p99 is then only known to be at least ``lo``, the way MLPerf LoadGen's early-stopping
  estimate refuses to claim a tail percentile that the sample cannot support;
- "p-quantile <= limit" (an SLO): a one-sided binomial test on the count of requests over the
  limit (MLPerf LoadGen's early-stopping test), giving pass, fail or undecided;
- a mean over repeats (achieved rate, throughput): Student's t interval (``scipy.stats.t``);
- perplexity and its change to another variant on the same documents: a cluster bootstrap over
  source pages (chunks of one page are not independent; paired, seeded) for the standard error of
  the log, with Student's t over pages - 1 degrees of freedom for the interval and the p-value;
- two latency samples (a drift control, two variants at one rate): Mann-Whitney U;
- a family of comparisons (every pair of variants on one criterion): Holm's step-down correction
  (statsmodels); a test repeated on pooled data (a knee probe's repeats): Bonferroni over looks.

An ``Estimate`` is a point value with its interval; a ``Comparison`` is a difference with its
interval, a p-value where the method has one, and whether the evidence separates the two.

Three modules, every name imported from here: core (the result types, shares, percentiles,
means), compare (paired accuracy, two latency samples, Holm, looks), ppl (perplexity over pages).

    python -m pytest tests/test_stats.py         # checked against scipy reference calls
    python benchmarks/stats_intervals.py         # cost of every interval of a 100,000-request report
"""

from workbench.stats.compare import (compare_samples, holm, look_alpha, newcombe_p_value, newcombe_paired,
                                     paired_accuracy, power_paired_accuracy, ratio_bounds)
from workbench.stats.core import (ALPHA, BOOTSTRAP_RESAMPLES, LEVEL, Comparison, Estimate, Verdict, mean,
                                  min_samples_for_upper_bound, percentile, percentiles, proportion,
                                  quantile_within, share_at_least)
from workbench.stats.ppl import log_ratio_se, n_to_resolve, perplexity, perplexity_change, power_perplexity_change

__all__ = [
    "ALPHA", "BOOTSTRAP_RESAMPLES", "LEVEL", "Comparison", "Estimate", "Verdict", "compare_samples", "holm",
    "log_ratio_se", "look_alpha", "mean", "min_samples_for_upper_bound", "n_to_resolve", "newcombe_p_value",
    "newcombe_paired", "paired_accuracy", "percentile", "percentiles", "perplexity", "perplexity_change",
    "power_paired_accuracy", "power_perplexity_change", "proportion", "quantile_within", "ratio_bounds",
    "share_at_least",
]
