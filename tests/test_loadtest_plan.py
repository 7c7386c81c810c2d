"""The load plan without a server: blocks, their seeded counterbalanced order, the knee on
steady-state steps only, the concurrency mode (workbench/loadtest/plan.py)."""

import math

import pytest

from workbench.config import KneeConfig, LoadtestConfig
from workbench.loadtest.plan import Outcome, Point, block_order, effective_verdict, make_plan
from workbench.stats import Verdict

PASS, FAIL = Verdict.passed, Verdict.failed


def drain(plan, outcome=lambda spec: Outcome(PASS)):
    blocks = []
    while (block := plan.next_block()) is not None:
        blocks.append(block)
        for spec in block:
            plan.observe(spec, outcome(spec))
    return blocks


def test_sweep_blocks_hold_every_arm_once_per_rate_and_repeat():
    cfg = LoadtestConfig(rates=[1, 2], repeats=3, order="fixed")
    blocks = drain(make_plan(cfg, ["a", "b", "c"]))
    assert [[s.arm for s in b] for b in blocks] == [["a", "b", "c"]] * 6
    assert [(b[0].point.rate, b[0].repeat, b[0].block) for b in blocks] == [
        (1, 0, 0), (2, 0, 1), (1, 1, 2), (2, 1, 3), (1, 2, 4), (2, 2, 5)]
    assert {s.index for b in blocks for s in b if s.point.rate == 2} == {1}  # same requests for every arm


def test_order_within_blocks_is_a_seeded_permutation_that_varies_between_blocks():
    arms = ["a", "b", "c", "d"]
    orders = [block_order(arms, k, seed=11, order="randomized") for k in range(12)]
    assert all(sorted(o) == arms for o in orders)
    assert len({tuple(o) for o in orders}) > 3  # counterbalanced, not one fixed order
    assert orders == [block_order(arms, k, seed=11, order="randomized") for k in range(12)]  # reproducible
    assert orders != [block_order(arms, k, seed=12, order="randomized") for k in range(12)]  # seeded
    firsts = [o[0] for o in [block_order(arms, k, 0, "randomized") for k in range(400)]]
    assert all(60 < firsts.count(a) < 140 for a in arms)  # every arm leads a block about as often


def test_abba_order_reverses_every_other_block():
    cfg = LoadtestConfig(rates=[1], repeats=4, order="abba")
    blocks = drain(make_plan(cfg, ["a", "b"]))
    assert ["".join(s.arm for s in b) for b in blocks] == ["ab", "ba", "ab", "ba"]


def test_an_arm_below_the_goodput_floor_skips_its_higher_rates_only():
    cfg = LoadtestConfig(rates=[1, 2, 4], repeats=1, order="fixed", stop_below_goodput=0.5)
    blocks = drain(make_plan(cfg, ["a", "b"]),
                   lambda s: Outcome(FAIL, goodput_fraction=0.1 if s.arm == "b" and s.point.rate == 2 else 1.0))
    assert [[(s.arm, s.point.rate) for s in b] for b in blocks] == [
        [("a", 1), ("b", 1)], [("a", 2), ("b", 2)], [("a", 4)]]


def test_concurrency_mode_is_a_closed_loop_point_per_concurrency():
    cfg = LoadtestConfig(mode="concurrency", concurrencies=[1, 2, 4], repeats=2, order="fixed")
    blocks = drain(make_plan(cfg, ["a"]))
    points = [b[0].point for b in blocks]
    assert [p.concurrency for p in points] == [1, 2, 4, 1, 2, 4]
    assert all(math.isinf(p.rate) for p in points)
    assert [b[0].label for b in blocks] == ["conc_1", "conc_2", "conc_4", "conc_1-r1", "conc_2-r1", "conc_4-r1"]


def test_a_step_whose_backlog_grew_is_a_fail_and_a_step_too_short_to_tell_never_a_pass():
    assert effective_verdict(Outcome(PASS, steady=True)) is PASS
    assert effective_verdict(Outcome(PASS, steady=False)) is FAIL  # not sustainable
    assert effective_verdict(Outcome(PASS, steady=None)) is Verdict.undecided
    assert effective_verdict(Outcome(FAIL, steady=None)) is FAIL  # latency only grows while a queue builds


def knee_cfg(**kw) -> LoadtestConfig:
    return LoadtestConfig(mode="knee", order="fixed", repeats=1, knee=KneeConfig(
        start_req_per_s=10, tolerance=0.2, max_probes=8, max_repeats=2, **kw))


def test_knee_brackets_on_steady_state_steps_only():
    """Capacity 30 req/s by the SLO alone, but at 20 req/s the backlog grows: the knee must not
    take the SLO's pass at 20 (a ramp) as sustained."""
    plan = make_plan(knee_cfg(), ["a"])
    drain(plan, lambda s: Outcome(PASS if s.point.rate <= 30 else FAIL, steady=s.point.rate < 20))
    knee = plan.knees()["a"]
    assert knee.lo is not None and knee.lo < 20 and knee.hi <= 20
    assert all(p.verdict is not PASS for p in knee.probes if p.rate >= 20)


def test_a_knee_probe_too_short_to_tell_is_measured_again_then_counted_undecided():
    plan = make_plan(knee_cfg(), ["a"])
    blocks = drain(plan, lambda s: Outcome(PASS, steady=None if s.point.rate == 10 else True))
    assert [b[0].label for b in blocks][:2] == ["rate_10", "rate_10-r1"]  # the same rate again
    knee = plan.knees()["a"]
    assert knee.probes[0].verdict is Verdict.undecided and knee.probes[0].repeats == 2
    assert knee.lo is None or knee.lo < 10  # never a pass at 10 req/s


def test_knee_low_load_blocks_spread_over_the_run_and_every_arm_advances_per_block():
    cfg = knee_cfg(low_load_req_per_s=1).model_copy(update={"repeats": 3})
    plan = make_plan(cfg, ["a", "b"])
    blocks = drain(plan, lambda s: Outcome(PASS if s.point.rate <= 40 else FAIL))
    roles = [b[0].role for b in blocks]
    assert roles[0] == "low-load" and roles.count("low-load") == 3
    assert roles.index("low-load", 1) > 1  # the second low-load block comes after probe blocks
    assert all(sorted(s.arm for s in b) == ["a", "b"] for b in blocks)
    assert all(len({s.point for s in b}) == 1 for b in blocks if b[0].role == "low-load")


def test_a_stopped_knee_plan_ends_each_search_with_its_bracket():
    plan = make_plan(knee_cfg(), ["a", "b"])
    for spec in plan.next_block():
        plan.observe(spec, Outcome(PASS))
    plan.stop("the time budget ran out")
    assert plan.next_block() is None
    assert all(k.note.startswith("not finished: the time budget") and k.lo == 10 for k in plan.knees().values())


def test_point_labels():
    assert Point(2.0).label == "rate_2" and Point(math.inf).label == "rate_inf" and Point(math.inf, 8).label == "conc_8"


def test_knee_probes_are_judged_at_the_level_split_over_their_looks(monkeypatch):
    # the executor, not only summary.look_level: a knee probe's verdict uses the split level,
    # a sweep step the ordinary one (issue 28, finding 6)
    from types import SimpleNamespace

    from workbench import stats
    from workbench.config import LoadtestConfig
    from workbench.loadgen import summary
    from workbench.loadtest import executor

    seen = []

    def verdict(cols, slo, level=stats.LEVEL):
        seen.append(level)
        return SimpleNamespace(overall=stats.Verdict.undecided)

    monkeypatch.setattr(executor.summary, "slo_verdict", verdict)
    step = SimpleNamespace(steady_state=None, steady_reached=None, metrics={})
    executor.outcome(LoadtestConfig(mode="knee", knee={"max_repeats": 3}), step, None)
    executor.outcome(LoadtestConfig(mode="sweep"), step, None)
    assert seen == [pytest.approx(summary.look_level(3)), stats.LEVEL] and seen[0] > stats.LEVEL
