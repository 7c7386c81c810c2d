"""What the server and the machine did during a step, beside what the client measured.

``StepProbe`` scrapes the server's Prometheus ``/metrics`` before and after a step (vLLM's own
TTFT and queue-time histograms; preemptions, prefix-cache hits and queries, finished requests as
counter deltas) and, in a background thread every ``interval_s``, samples:

- vLLM's scheduler state (``GAUGES``): running and waiting sequences, KV-cache usage; with the
  server's ``max_num_seqs`` (passed in: it is not on /metrics) the share of samples at that cap;
- this host's CPU, every core (``/proc/stat`` through psutil ``cpu_times(percpu=True)``, deltas
  of our own so another psutil user cannot move our baseline): busy cores out of N;
- GPU utilization (NVML, when ``pynvml`` imports and sees a GPU) or the host's CPU percent;
- with the managed server's pid, the CPU of each process by role (the API front-end, the engine
  core, workers, and this client).

``limits.limit`` names what bound the step from these numbers. Every part is optional: a server
without ``/metrics`` (a gateway may serve none) just yields fewer keys. Metric names are vLLM
0.26-0.33's (V1 engine), with the older names they replaced as fallbacks.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict

import numpy as np

from workbench import promscrape, stats
from workbench.loadgen.limits import limit, limiting_factor  # noqa: F401  (re-exported: callers import it here)
from workbench.loadgen.samplers import _HostCPU, _ProcessCPU, _Utilization  # noqa: F401

log = logging.getLogger(__name__)
HISTOGRAMS = {"server_ttft": "vllm:time_to_first_token_seconds",
              "server_queue": "vllm:request_queue_time_seconds",
              "server_e2el": "vllm:e2e_request_latency_seconds"}
# Sampled gauges: key -> names, newest first (vLLM V0 / early V1 spelled the KV gauge
# gpu_cache_usage_perc). kv_cache_usage_perc is a fraction 0..1 despite its name.
GAUGES = {"running": ("vllm:num_requests_running",), "waiting": ("vllm:num_requests_waiting",),
          "kv_cache_usage_frac": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")}
KV_GAUGE = GAUGES["kv_cache_usage_frac"][0]
# Counters read as deltas over the step: key -> names (prefix-cache counters count TOKENS; before
# vLLM 0.10 they were gpu_prefix_cache_*).
COUNTERS = {"server_preemptions": ("vllm:num_preemptions_total",),
            "server_requests_finished": ("vllm:request_success_total",),
            "server_prefix_cache_hits_tokens": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
            "server_prefix_cache_queries_tokens": ("vllm:prefix_cache_queries_total",
                                                   "vllm:gpu_prefix_cache_queries_total")}


def _first(samples: list[promscrape.Sample], names: tuple[str, ...]) -> float:
    for name in names:
        v = promscrape.total(samples, name)
        if not math.isnan(v):
            return v
    return math.nan


def _try_scrape(root_url: str, headers: dict | None) -> list[promscrape.Sample] | None:
    try:
        return promscrape.scrape(root_url, headers=headers, timeout=5)
    except Exception as err:
        log.debug("no /metrics at %s (%s)", root_url, err)
        return None


class StepProbe:
    """``start()`` before a step, ``stop() -> dict`` after it (flat keys with units). ``max_num_seqs``:
    the server's admission cap when known (a managed server's config), recorded and compared
    with the running count."""

    def __init__(self, root_url: str | None, interval_s: float = 0.5, headers: dict | None = None,
                 server_pid: int | None = None, max_num_seqs: int | None = None):
        self.root_url = root_url  # None: no scraping
        self.interval_s = interval_s
        self.headers = headers
        self.max_num_seqs = max_num_seqs
        self._stop = threading.Event()
        self._util: list[float] = []
        self._mem: list[float] = []
        self._gauges: dict[str, list[float]] = defaultdict(list)
        self._before = None
        self._thread: threading.Thread | None = None
        self._meter = _Utilization(server_pid)
        self._server_pid = server_pid
        self._proc_cpu: _ProcessCPU | None = None
        self._host: _HostCPU | None = None

    def start(self) -> "StepProbe":
        if self.root_url:
            self._before = _try_scrape(self.root_url, self.headers)
        try:
            self._proc_cpu = _ProcessCPU(self._server_pid)
            self._host = _HostCPU()
        except Exception as err:  # no psutil: fewer keys, same step
            log.debug("no per-process / host CPU: %s", err)
        self._thread = threading.Thread(target=self._loop, name="loadtest-probe", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            util, mem = self._meter.sample()
            self._util.append(util)
            if mem is not None:
                self._mem.append(mem)
            for sampler in (self._proc_cpu, self._host):
                if sampler is not None:
                    sampler.sample()
        except Exception as err:
            log.debug("utilization sample failed: %s", err)

    def _scrape_gauges(self) -> None:
        samples = _try_scrape(self.root_url, self.headers)
        for key, names in GAUGES.items():
            v = _first(samples or [], names)
            if not math.isnan(v):
                self._gauges[key].append(v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()
            if self._before is not None:
                self._scrape_gauges()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        self._sample()  # CPU: the share since the last sample, so a step shorter than one interval counts
        out: dict[str, float] = {}
        src = self._meter.source
        if self._util:
            out[f"{src}_util_pct_mean"] = sum(self._util) / len(self._util)
            est = stats.mean(self._util)  # t interval over the samples (neighbours correlate: approximate)
            if est.lo is not None:
                out[f"{src}_util_pct_mean_ci_lo"], out[f"{src}_util_pct_mean_ci_hi"] = est.lo, est.hi
            out[f"{src}_util_samples"] = float(len(self._util))
            out[f"{src}_util_pct_max"] = max(self._util)
        if self._mem:
            out["gpu_mem_gib_max"] = max(self._mem)
        for sampler in (self._proc_cpu, self._host):
            if sampler is not None:
                out.update(sampler.summary())
        if self.max_num_seqs is not None:
            out["server_max_num_seqs"] = float(self.max_num_seqs)
        after = _try_scrape(self.root_url, self.headers) if self._before is not None else None
        if after is not None:
            out.update(server_metrics(self._before, after))
            if not self._gauges:  # a step shorter than one interval: the end state is all we saw
                for key, names in GAUGES.items():
                    v = _first(after, names)
                    if not math.isnan(v):
                        self._gauges[key].append(v)
        out.update(gauge_summary(self._gauges, self.max_num_seqs))
        return out


def gauge_summary(gauges: dict[str, list[float]], max_num_seqs: int | None = None) -> dict[str, float]:
    """Mean and max of each sampled scheduler gauge (``server_running_mean``, ``server_waiting_max``,
    ``server_kv_cache_usage_frac_max``, ...) and, against ``max_num_seqs``, the share of samples
    with the running count at the cap (``server_running_at_cap_frac``)."""
    out: dict[str, float] = {}
    for key, vals in gauges.items():
        if vals:
            out[f"server_{key}_mean"] = float(np.mean(vals))
            out[f"server_{key}_max"] = float(max(vals))
            out[f"server_{key}_samples"] = float(len(vals))
    running = gauges.get("running") or []
    if max_num_seqs and running:
        out["server_running_at_cap_frac"] = float(np.mean([v >= max_num_seqs for v in running]))
    return out


def server_metrics(before: list[promscrape.Sample], after: list[promscrape.Sample]) -> dict[str, float]:
    """Server-side numbers accumulated between two scrapes; absent series are left out. The prefix
    cache's hit rate is hits / queries in tokens (vLLM counts both per prompt token looked up)."""
    out: dict[str, float] = {}
    for key, name in HISTOGRAMS.items():
        buckets = promscrape.delta_buckets(before, after, name)
        for q in (0.5, 0.99):
            v = promscrape.histogram_quantile(q, buckets)
            if not math.isnan(v):
                out[f"{key}_ms_p{round(q * 100)}"] = v * 1000
    for key, names in COUNTERS.items():
        v = _first(after, names) - _first(before, names)
        if not math.isnan(v):
            out[key] = v
    queries = out.get("server_prefix_cache_queries_tokens")
    if queries:
        out["server_prefix_cache_hit_rate"] = out.get("server_prefix_cache_hits_tokens", 0.0) / queries
    return out
