"""Scrape and read a Prometheus text endpoint (vLLM's /metrics, the gateway's) without vLLM.

    before = scrape("http://127.0.0.1:8000"); ...; after = scrape(...)
    delta(before, after, "vllm:num_preemptions_total")
    histogram_quantile(0.99, delta_buckets(before, after, "vllm:time_to_first_token_seconds"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def parse(text: str) -> list[Sample]:
    return [Sample(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(root_url: str, path: str = "/metrics", headers: dict | None = None,
           timeout: float = 10) -> list[Sample]:
    r = httpx.get(root_url.rstrip("/") + path, headers=headers, timeout=timeout)
    r.raise_for_status()
    return parse(r.text)


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of a series over every label set matching ``labels`` (NaN if the series is absent)."""
    vals = [s.value for s in samples
            if s.name == name and all(dict(s.labels).get(k) == v for k, v in labels.items())]
    return sum(vals) if vals else math.nan


def delta(before: list[Sample], after: list[Sample], name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def delta_buckets(before: list[Sample], after: list[Sample], name: str) -> list[tuple[float, float]]:
    """Histogram buckets (upper bound, count) accumulated between two scrapes, summed over labels."""
    def buckets(samples):
        out: dict[float, float] = {}
        for s in samples:
            if s.name == f"{name}_bucket":
                le = float(dict(s.labels)["le"])
                out[le] = out.get(le, 0.0) + s.value
        return out
    b, a = buckets(before), buckets(after)
    return sorted((le, a[le] - b.get(le, 0.0)) for le in a)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 1.0)
        prev_le, prev_count = le, count
    return buckets[-1][0]
