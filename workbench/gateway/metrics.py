"""The gateway's Prometheus metrics, in a registry of its own (one per app, so tests can run
several gateways in one process). Names carry units, as Prometheus' naming guide asks. The
per-request ones are loopmetrics' lock-free counters and histograms (updated on the event
loop's thread only), exposed through this registry like prometheus_client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from workbench.gateway.loopmetrics import LoopCounter as Counter, LoopHistogram as Histogram

# Sub-millisecond buckets too: the gateway's own overhead is measured in them.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0,
                   1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MODERATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        p = "workbench_gateway_"
        self.requests = Counter(p + "requests", "Requests by route, model and HTTP status",
                                ["route", "model", "status"], registry=r)
        self.latency = Histogram(p + "request_duration_seconds", "Request arrival to last byte sent",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "Streams: request arrival to the first event sent",
                              ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(p + "overhead_seconds",
                                  "Time spent in the gateway before the upstream call",
                                  ["route"], buckets=MODERATION_BUCKETS, registry=r)
        self.tokens = Counter(p + "tokens", "Tokens from upstream usage", ["model", "kind"], registry=r)
        self.filter_hits = Counter(p + "filter_hits", "Sensitive-word filter matches",
                                   ["stage", "action"], registry=r)
        self.moderation_blocks = Counter(p + "moderation_blocks", "Requests a moderation policy flagged",
                                         ["policy", "stage"], registry=r)
        self.moderation_latency = Histogram(p + "moderation_duration_seconds",
                                            "Time one moderation check took", ["policy", "stage"],
                                            buckets=MODERATION_BUCKETS, registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Upstream failures by kind",
                                       ["upstream", "kind"], registry=r)
        self.rate_limited = Counter(p + "rate_limited", "Requests refused with 429",
                                    ["key_id", "limit"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
