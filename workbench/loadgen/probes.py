"""What the server and the machine did during a step, beside what the client measured.

``StepProbe`` scrapes the server's Prometheus ``/metrics`` before and after a step (vLLM's own
TTFT and queue-time histograms, preemptions) and, in a background thread, samples utilization
(GPU through NVML when ``pynvml`` imports and sees a GPU, else this machine's CPU through psutil)
and vLLM's KV-cache usage gauge. With the managed server's pid it also samples the CPU of each
process by role (the API front-end, the engine core, GPU workers, and this client with its
helper processes): the busiest process of a role near 100% of a core is that role's ceiling,
which is how ``limiting_factor`` names what limited a step. Every part is optional: a server without ``/metrics`` (the fake
server serves a tiny one; a gateway may serve none) just yields fewer keys.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict

from workbench import promscrape, stats

log = logging.getLogger(__name__)
HISTOGRAMS = {"server_ttft": "vllm:time_to_first_token_seconds",
              "server_queue": "vllm:request_queue_time_seconds",
              "server_e2el": "vllm:e2e_request_latency_seconds"}
KV_GAUGE = "vllm:kv_cache_usage_perc"  # a fraction 0..1 despite its name


class _Utilization:
    """CPU percent (psutil, whole machine) or GPU utilization (NVML). On a machine of several GPUs
    only those running the server's processes count (found from ``server_pid``'s process tree), so
    one busy GPU of four reads as busy, not as 25%; every GPU when none can be matched."""

    def __init__(self, server_pid: int | None = None):
        self.source = "cpu"
        self._nvml = None
        self._server_pid = server_pid
        self._mine: list | None = None  # the server's GPUs, once seen
        try:
            import pynvml

            pynvml.nvmlInit()
            n = pynvml.nvmlDeviceGetCount()
            if n:
                self._nvml = (pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)])
                self.source = "gpu"
        except Exception:  # no pynvml, no driver, no GPU: CPU it is
            self._nvml = None
        if self._nvml is None:
            import psutil

            self._psutil = psutil
            psutil.cpu_percent(interval=None)  # the first call only sets the baseline

    def _server_gpus(self) -> list:
        nv, handles = self._nvml
        if self._mine is not None or not self._server_pid:
            return self._mine or handles
        try:
            import psutil

            root = psutil.Process(self._server_pid)
            pids = {root.pid, *(c.pid for c in root.children(recursive=True))}
            running = {id(h): {p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(h)} for h in handles}
            # In a container NVML may list host pids: then the GPUs running anything at all.
            mine = ([h for h in handles if pids & running[id(h)]]
                    or [h for h in handles if running[id(h)]])
        except Exception:  # process gone, or NVML cannot list processes: all GPUs
            mine = []
        if mine:
            self._mine = mine
        return mine or handles

    def sample(self) -> tuple[float, float | None]:
        """(utilization %, GPU memory used GiB or None)."""
        if self._nvml:
            nv = self._nvml[0]
            handles = self._server_gpus()
            util = [nv.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            mem = [nv.nvmlDeviceGetMemoryInfo(h).used / 2**30 for h in handles]
            return sum(util) / len(util), sum(mem)
        return self._psutil.cpu_percent(interval=None), None


def _role(cmdline: str, is_root: bool) -> str:
    """vLLM retitles its processes (setproctitle): VLLM::APIServer_0, VLLM::EngineCore, ..."""
    if "EngineCore" in cmdline:
        return "engine_core"
    if "APIServer" in cmdline or is_root:
        return "api_server"  # with one API server the root process serves HTTP itself
    if "Worker" in cmdline:
        return "worker"  # the model's forward pass (vLLM-CPU runs it here, as do TP ranks on GPUs)
    return "server_other"


class _ProcessCPU:
    """Per-role CPU percent (100 = one core) of the server's process tree and of this client."""

    def __init__(self, server_pid: int | None):
        import psutil

        self._ps = psutil
        self.server_pid = server_pid
        self._procs: dict[int, tuple[object, str]] = {}
        self.busiest: dict[str, list[float]] = defaultdict(list)  # role -> per-sample max process
        self.total: dict[str, list[float]] = defaultdict(list)  # role -> per-sample sum
        self.sample()  # the first reading of each process only sets its baseline

    def _current(self) -> list[tuple[object, str]]:
        ps = self._ps
        me = ps.Process()
        server: list = []
        if self.server_pid:
            try:
                root = ps.Process(self.server_pid)
                server = [root, *root.children(recursive=True)]
            except ps.Error:
                server = []
        server_pids = {p.pid for p in server}
        out = []
        for p in server:
            try:
                out.append((p, _role(" ".join(p.cmdline()), p.pid == self.server_pid)))
            except ps.Error:
                continue
        out += [(p, "client") for p in [me, *me.children(recursive=True)] if p.pid not in server_pids]
        return out

    def sample(self) -> None:
        busiest: dict[str, float] = defaultdict(float)
        total: dict[str, float] = defaultdict(float)
        for proc, role in self._current():
            known = self._procs.get(proc.pid)
            if known is None:  # new process: baseline now, counted from the next sample
                self._procs[proc.pid] = (proc, role)
                try:
                    proc.cpu_percent(None)
                except self._ps.Error:
                    pass
                continue
            try:
                v = known[0].cpu_percent(None)
            except self._ps.Error:
                continue
            busiest[role] = max(busiest[role], v)
            total[role] += v
        for role in total:
            self.busiest[role].append(busiest[role])
            self.total[role].append(total[role])

    def summary(self) -> dict[str, float]:
        out = {}
        for role, vals in self.busiest.items():
            if vals:
                out[f"cpu_busiest_pct_{role}"] = sum(vals) / len(vals)
                out[f"cpu_total_pct_{role}"] = sum(self.total[role]) / len(self.total[role])
        return out


def limiting_factor(m: dict[str, float], min_goodput: float) -> str:
    """What limited a step, from its metrics: the client first (late sends hide everything behind
    them), then whether the server kept up at all, then which server part was pegged. vLLM's
    engine core spins at ~100% of a core whenever it has work, so a saturated step whose engine
    core got much less, with the GPU idle, was starved of CPU by the other processes on the host.
    ``min_goodput`` is the SLO's (``loadtest.slo.min_goodput``): no threshold of its own here."""
    if m.get("send_lag_ms_p99", 0.0) > 10:
        return "client (late sends)"
    kept_up = m.get("goodput_fraction", 1.0) >= min_goodput  # loadtest.slo.min_goodput: the one SLO
    if kept_up:
        return "none (below saturation)"
    if m.get("cpu_busiest_pct_api_server", 0.0) >= 90:
        return "server front-end (API server CPU)"
    if m.get("gpu_util_pct_mean", 0.0) >= 90:
        return "gpu"
    if "gpu_util_pct_mean" not in m and m.get("cpu_busiest_pct_worker", 0.0) >= 90:
        return "model compute (CPU worker)"
    engine = m.get("cpu_busiest_pct_engine_core")
    if engine is not None and engine >= 90:
        return "engine core CPU (scheduling / step overhead)"
    if engine is not None and engine < 80 and m.get("gpu_util_pct_mean", 100.0) < 50:
        return "engine core starved of CPU (other busy processes on its cores)"
    return "undetermined (no part pegged; see queue time and KV-cache usage)"


def _try_scrape(root_url: str, headers: dict | None) -> list[promscrape.Sample] | None:
    try:
        return promscrape.scrape(root_url, headers=headers, timeout=5)
    except Exception as err:
        log.debug("no /metrics at %s (%s)", root_url, err)
        return None


class StepProbe:
    def __init__(self, root_url: str | None, interval_s: float = 0.5, headers: dict | None = None,
                 server_pid: int | None = None):
        self.root_url = root_url  # None: no scraping
        self.interval_s = interval_s
        self.headers = headers
        self._stop = threading.Event()
        self._util: list[float] = []
        self._mem: list[float] = []
        self._kv: list[float] = []
        self._before = None
        self._thread: threading.Thread | None = None
        self._meter = _Utilization(server_pid)
        self._server_pid = server_pid
        self._proc_cpu: _ProcessCPU | None = None

    def start(self) -> "StepProbe":
        if self.root_url:
            self._before = _try_scrape(self.root_url, self.headers)
        try:
            self._proc_cpu = _ProcessCPU(self._server_pid)
        except Exception as err:  # no psutil: fewer keys, same step
            log.debug("no per-process CPU: %s", err)
        self._thread = threading.Thread(target=self._loop, name="loadtest-probe", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            util, mem = self._meter.sample()
            self._util.append(util)
            if mem is not None:
                self._mem.append(mem)
            if self._proc_cpu is not None:
                self._proc_cpu.sample()
        except Exception as err:
            log.debug("utilization sample failed: %s", err)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()
            if self._before is not None:
                samples = _try_scrape(self.root_url, self.headers)
                if samples:
                    kv = promscrape.total(samples, KV_GAUGE)
                    if not math.isnan(kv):
                        self._kv.append(kv)

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
        if self._proc_cpu is not None:
            out.update(self._proc_cpu.summary())
        after = _try_scrape(self.root_url, self.headers) if self._before is not None else None
        if after is not None:
            out.update(server_metrics(self._before, after))
            kv = promscrape.total(after, KV_GAUGE)
            kvs = self._kv + ([] if math.isnan(kv) else [kv])
            if kvs:
                out["server_kv_cache_usage_frac_max"] = max(kvs)
        return out


def server_metrics(before: list[promscrape.Sample], after: list[promscrape.Sample]) -> dict[str, float]:
    """Server-side numbers accumulated between two scrapes; absent series are left out."""
    out: dict[str, float] = {}
    for key, name in HISTOGRAMS.items():
        buckets = promscrape.delta_buckets(before, after, name)
        for q in (0.5, 0.99):
            v = promscrape.histogram_quantile(q, buckets)
            if not math.isnan(v):
                out[f"{key}_ms_p{round(q * 100)}"] = v * 1000
    for key, name in (("server_preemptions", "vllm:num_preemptions_total"),
                      ("server_requests_finished", "vllm:request_success_total")):
        v = promscrape.delta(before, after, name)
        if not math.isnan(v):
            out[key] = v
    return out
