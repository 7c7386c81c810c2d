"""Counters and histograms for the gateway's per-request metrics, kept as plain numbers on the
event loop's thread and turned into Prometheus metric families only when ``/metrics`` is read.

prometheus_client's ``Counter``/``Histogram`` take a lock per ``inc``/``observe`` (a histogram:
two, one for the sum and one for the bucket), check observability, and walk the buckets in
Python; a request made ~9 such calls, ~9 us of the gateway's ~0.3 ms
(``benchmarks/gateway_perf.py --py-spy``). Every update here comes from the event loop's
thread (app.py, checks.py, relay.py, upstream.py; the audit writer has its own
``AuditCollector``), so no lock is needed: one ``+=`` and, for a histogram, one ``bisect``.

The exposition is prometheus_client's own (same registry, same ``generate_latest``): the same
names, ``_total``/``_created``/``_bucket``/``_count``/``_sum`` samples, label order and ``le``
strings as its ``Counter`` and ``Histogram`` would give, so dashboards, rules and tests read
the same series.
"""

from __future__ import annotations

import bisect
import time

from prometheus_client import metrics as _pm
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import INF, floatToGoString


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self):
        self.value, self.created = 0.0, time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as prometheus_client: a counter only goes up
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum, self.created = 0.0, time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        # the first bucket whose upper bound is >= amount (le: less than or equal)
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1


class _Family:
    """One metric and its labelled children; ``labels(*values)`` as prometheus_client's."""
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: list[str] | tuple[str, ...],
                 registry: CollectorRegistry | None = None):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: object):
        # Callers pass strings: one dict lookup (~0.15 us). Other values are looked up as str.
        child = self._children.get(values)
        if child is None:
            key = tuple(str(v) for v in values)
            child = self._children.get(key)
            if child is None:
                if len(key) != len(self.labelnames):
                    raise ValueError("Incorrect label count")
                child = self._children[key] = self._child()
        return child

    def describe(self) -> list[Metric]:  # the registry checks names at register() without collecting
        return [Metric(self.name, self.documentation, self.kind)]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        for values, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, values))
            for suffix, extra, value in self._samples(child):
                metric.add_sample(self.name + suffix, {**labels, **extra}, value)
        return [metric]


class LoopCounter(_Family):
    kind = "counter"

    def _child(self) -> _CounterChild:
        return _CounterChild()

    def _samples(self, c: _CounterChild):
        yield "_total", {}, c.value
        if _pm._use_created:  # PROMETHEUS_DISABLE_CREATED_SERIES, read as prometheus_client does
            yield "_created", {}, c.created


class LoopHistogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames, buckets: tuple[float, ...],
                 registry: CollectorRegistry | None = None):
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        self.bounds = bounds if bounds[-1] == INF else (*bounds, INF)
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def _samples(self, h: _HistogramChild):
        acc = 0
        for bound, n in zip(self.bounds, h.counts):
            acc += n
            yield "_bucket", {"le": floatToGoString(bound)}, float(acc)
        yield "_count", {}, float(acc)
        yield "_sum", {}, h.sum
        if _pm._use_created:
            yield "_created", {}, h.created
