"""Samplers of one machine during a load step (used by ``probes.StepProbe``): GPU utilization
through NVML or the host's CPU percent, every core's busy share, and the CPU of each process of
the server (by role) and of this client. psutil and pynvml only; nothing here knows of vLLM
beyond the process titles it sets.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class _HostCPU:
    """Busy cores of this host: per-CPU ``cpu_times`` deltas between samples (busy = all but idle
    and iowait), so 100 % of every core of N reads N busy cores."""

    def __init__(self):
        import psutil

        self._ps = psutil
        self._last = psutil.cpu_times(percpu=True)
        self.n = len(self._last)
        self.busy_cores: list[float] = []
        self.busiest_pct: list[float] = []

    @staticmethod
    def _split(t) -> tuple[float, float]:
        idle = t.idle + getattr(t, "iowait", 0.0)
        return sum(t) - idle, sum(t)

    def sample(self) -> None:
        now = self._ps.cpu_times(percpu=True)
        shares = []
        for a, b in zip(self._last, now):
            (busy0, tot0), (busy1, tot1) = self._split(a), self._split(b)
            if tot1 > tot0:
                shares.append(min(1.0, max(0.0, (busy1 - busy0) / (tot1 - tot0))))
        self._last = now
        if shares:
            self.busy_cores.append(sum(shares))
            self.busiest_pct.append(100 * max(shares))

    def summary(self) -> dict[str, float]:
        if not self.busy_cores:
            return {}
        return {"host_cpus": float(self.n), "host_cpu_busy_cores_mean": float(np.mean(self.busy_cores)),
                "host_cpu_busy_cores_max": float(max(self.busy_cores)),
                "host_cpu_busiest_core_pct_mean": float(np.mean(self.busiest_pct)),
                "host_cpu_samples": float(len(self.busy_cores))}


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


