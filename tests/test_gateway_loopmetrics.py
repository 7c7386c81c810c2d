"""workbench/gateway/loopmetrics.py: the gateway's lock-free counters and histograms expose
exactly what prometheus_client's Counter and Histogram expose for the same updates."""

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from workbench.gateway.loopmetrics import LoopCounter, LoopHistogram
from workbench.gateway.metrics import LATENCY_BUCKETS


def _exposition(counter_cls, histogram_cls, render) -> str:
    r = CollectorRegistry()
    c = counter_cls("t_requests", "Requests", ["route", "status"], registry=r)
    h = histogram_cls("t_duration_seconds", "Time", ["route"], buckets=LATENCY_BUCKETS, registry=r)
    c.labels("/a", 200).inc()
    c.labels("/a", "200").inc(2.5)  # the same series: label values are strings
    c.labels("/b", 404).inc(0)
    for v in (0.0001, 0.0005, 0.0006, 1.0, 200.0, 0.25, -1.0):  # 0.0005 and 1.0 sit on bounds
        h.labels("/a").observe(v)
    h.labels("/b")  # a series made at zero
    # _created holds each series' creation time, which differs between the two runs
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", render(r).decode())


@pytest.mark.parametrize("render", [generate_latest, generate_openmetrics], ids=["text", "openmetrics"])
def test_exposition_is_prometheus_clients_for_the_same_updates(render):
    ours = _exposition(LoopCounter, LoopHistogram, render)
    assert ours == _exposition(Counter, Histogram, render)
    assert 't_duration_seconds_bucket{le="0.0005",route="/a"} 3.0' in ours  # -1, 0.0001, 0.0005 (le)
    assert 't_requests_total{route="/a",status="200"} 3.5' in ours


def test_counter_refuses_a_negative_increment():
    c = LoopCounter("t_c", "c", ["x"])
    with pytest.raises(ValueError, match="non-negative"):
        c.labels("a").inc(-1)


def test_wrong_label_count_is_refused():
    with pytest.raises(ValueError, match="label count"):
        LoopHistogram("t_h", "h", ["a", "b"], buckets=(1.0,)).labels("only-one")


def test_a_name_registered_twice_is_refused():
    r = CollectorRegistry()
    LoopCounter("t_dup", "d", ["x"], registry=r)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("t_dup", "d", ["x"], registry=r)


def test_unsorted_buckets_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        LoopHistogram("t_u", "u", ["x"], buckets=(2.0, 1.0))
