"""What bound a load step, named from its measured numbers, with those numbers as evidence.

``limit(m, min_goodput, steady)`` reads one step's flat metrics (``metrics.step_metrics`` plus
``probes.StepProbe.stop``) and returns a ``Limit``: a short name and the evidence, e.g.
``admission cap: running 256 = max_num_seqs 256 in 93 % of samples, waiting 40 (mean)``.
The rules, in order (the first that holds names the limit):

1. **client**: send lag p99 > 10 ms and > 5 % of the mean gap between arrivals, and the sends fell
   behind the schedule: the achieved send rate under 95 % of the scheduled one, or the
   load-generator process at >= 90 % of a core (where the step's numbers lack either, the lag
   alone counts). Requests left late, so whatever came after was measured at a lower offered load
   than planned; nothing behind it can be judged. (10 ms: one asyncio timer tick is < 1 ms here,
   and a server step of SmolLM2 on a GPU is ~5-50 ms. 5 % of the gap: at 0.5 req/s an 18 ms lag,
   seen on vLLM-CPU, moves the offered load by under 1 %, which is no limit. The schedule: on a
   16-core GPU host shared with three vLLM servers, sends ran 66-176 ms late at p99 in bursts
   while the achieved rate stayed 1.000 of the schedule and the client used 25-37 % of a core
   (results/gpu-3/run-4): the offered load held, so the lag is noted in the evidence of whatever
   did bind the step, not named as its limit.) In a closed-loop
   step (fixed concurrency) a request waits for a free slot by design, so lag is no evidence
   there; the load-generator process at >= 90 % of a core is. Late sends on a host whose cores
   are all busy, with the load generator itself not pegged, are named **host CPU** instead
   (measured on vLLM-CPU, 2 cores, 6 req/s: lag p99 625 ms, client at 8 % of a core).
2. **none**: the step kept up - goodput >= the SLO's ``min_goodput`` and, when the steady-state
   verdict is given, steady. The evidence shows the headroom (running vs cap, KV, host cores).
3. **admission cap**: vLLM ran ``max_num_seqs`` sequences (in >= half the samples, or at the
   peak) while requests waited. The scheduler's cap, not a resource, held the batch.
4. **KV cache**: usage >= 90 % at its peak, or any preemption (vLLM preempts only when a
   sequence needs a block and none is free) - with requests waiting or being preempted.
5. **host CPU**: >= 90 % of all host cores busy on average: nothing on the host had a core to
   spare (on vLLM-CPU this is the model's compute; on a GPU host, front-end, engine and client).
6. **API front-end**: the busiest API-server process >= 90 % of one core (HTTP, tokenizing and
   SSE run single-threaded per process).
7. **GPU**: utilization >= 90 % (NVML: the share of time a kernel ran).
8. **model compute (CPU worker)**: no GPU, and the worker process >= 90 % of a core.
9. **engine core**: its process >= 90 % of a core (scheduling and step overhead); or **engine
   core starved**: < 80 % with the GPU under 50 % busy (other processes took its core).
10. otherwise **undetermined**, with every number that was looked at.

Thresholds of 90 % leave room for sampling (0.5 s samples of a process that spins read 92-100 %).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

SEND_LAG_MS = 10.0
SEND_LAG_GAP_FRAC = 0.05  # of the mean gap between arrivals (1 / offered rate)
RATE_KEPT = 0.95  # achieved / scheduled send rate at or above this: the offered load held
BUSY = 90.0  # percent of a core / of the GPU / of the host's cores
KV_FULL = 0.9


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # client | none | admission cap | KV cache | host CPU | API front-end | GPU | ...
    evidence: str

    def __str__(self) -> str:
        return f"{self.name}: {self.evidence}"


def _f(v: float | None, fmt: str = ".0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _server_state(m: dict[str, float]) -> str:
    parts = []
    if "server_running_mean" in m:
        cap = m.get("server_max_num_seqs")
        parts.append(f"running {_f(m['server_running_mean'], '.1f')} mean / {_f(m.get('server_running_max'))} max"
                     + (f" of max_num_seqs {cap:.0f}" if cap else ""))
    if "server_waiting_mean" in m:
        parts.append(f"waiting {_f(m['server_waiting_mean'], '.1f')} mean")
    if "server_kv_cache_usage_frac_max" in m:
        parts.append(f"KV cache {100 * m['server_kv_cache_usage_frac_max']:.0f} % max")
    if "host_cpu_busy_cores_mean" in m:
        parts.append(f"host CPU {m['host_cpu_busy_cores_mean']:.1f} of {m.get('host_cpus', 0):.0f} cores")
    if "gpu_util_pct_mean" in m:
        parts.append(f"GPU {m['gpu_util_pct_mean']:.0f} %")
    return ", ".join(parts)


def limit(m: dict[str, float], min_goodput: float, steady=None, closed_loop: bool = False) -> Limit:
    """The rules of the module docstring. ``min_goodput``: the SLO's (``loadtest.slo``);
    ``steady``: the step's ``steady.SteadyState`` (or anything with ``reached``), if judged;
    ``closed_loop``: a fixed-concurrency step, whose send lag is its slot wait."""
    lag = m.get("send_lag_ms_p99", 0.0)
    rate = m.get("offered_req_per_s") or 0.0
    late = lag > SEND_LAG_MS and (rate <= 0 or lag > SEND_LAG_GAP_FRAC * 1000.0 / rate) and not closed_loop
    client = m.get("cpu_busiest_pct_client")
    kept = m.get("achieved_over_scheduled")
    if late and kept is not None and kept >= RATE_KEPT and (client is None or client < BUSY):
        # late in bursts, the offered load held: the lag is a note on what did bind the step
        found = _rules(m, min_goodput, steady, closed_loop, late=False)
        return found.model_copy(update={"evidence": f"{found.evidence}; sends up to {lag:.0f} ms late at p99 "
                                        f"(max {_f(m.get('send_lag_ms_max'))} ms), the rate kept "
                                        f"({kept:.3f} of the schedule)"})
    return _rules(m, min_goodput, steady, closed_loop, late)


def _rules(m: dict[str, float], min_goodput: float, steady, closed_loop: bool, late: bool) -> Limit:
    lag = m.get("send_lag_ms_p99", 0.0)
    client = m.get("cpu_busiest_pct_client")
    cores, n = m.get("host_cpu_busy_cores_mean"), m.get("host_cpus")
    host_full = cores is not None and bool(n) and cores >= BUSY / 100 * n
    if late and host_full and (client is None or client < BUSY):
        # the client shares a saturated host (vLLM-CPU on 2 cores: 625 ms lag with the load
        # generator at 8 % of a core): it lagged for want of a core, not for its own work
        return Limit(name="host CPU", evidence=f"{cores:.1f} of {n:.0f} cores busy (mean); the client's sends "
                     f"lagged for want of a core (send lag p99 {lag:.0f} ms)")
    if late:
        return Limit(name="client", evidence=f"send lag p99 {lag:.0f} ms (max {_f(m.get('send_lag_ms_max'))} ms)"
                     + (f"; load-generator process at {client:.0f} % of a core" if client is not None else ""))
    if closed_loop and client is not None and client >= BUSY:
        return Limit(name="client", evidence=f"load-generator process at {client:.0f} % of a core")
    goodput = m.get("goodput_fraction", 1.0)
    steady_ok = steady is None or bool(getattr(steady, "reached", steady))
    if goodput >= min_goodput and steady_ok:
        state = _server_state(m)
        return Limit(name="none", evidence=f"the step kept up (goodput {100 * goodput:.0f} %"
                     + (", steady" if steady is not None else "") + ")" + (f"; {state}" if state else ""))
    waiting = m.get("server_waiting_mean", 0.0)
    cap, running_max = m.get("server_max_num_seqs"), m.get("server_running_max")
    at_cap = m.get("server_running_at_cap_frac", 0.0)
    if cap and running_max is not None and (at_cap >= 0.5 or running_max >= cap) and m.get("server_waiting_max", 0) > 0:
        return Limit(name="admission cap", evidence=(
            f"running {running_max:.0f} = max_num_seqs {cap:.0f} (at the cap in {100 * at_cap:.0f} % of samples), "
            f"waiting {waiting:.1f} mean / {_f(m.get('server_waiting_max'))} max"))
    kv, preempt = m.get("server_kv_cache_usage_frac_max"), m.get("server_preemptions", 0.0)
    if (kv is not None and kv >= KV_FULL and (waiting > 0 or preempt > 0)) or preempt > 0:
        return Limit(name="KV cache", evidence=f"{100 * (kv or 0):.0f} % used (max), {preempt:.0f} preemptions, "
                     f"waiting {waiting:.1f} mean")
    if host_full:
        return Limit(name="host CPU", evidence=f"{cores:.1f} of {n:.0f} cores busy (mean)")
    api = m.get("cpu_busiest_pct_api_server", 0.0)
    if api >= BUSY:
        return Limit(name="API front-end", evidence=f"API-server process at {api:.0f} % of a core")
    gpu = m.get("gpu_util_pct_mean")
    if gpu is not None and gpu >= BUSY:
        return Limit(name="GPU", evidence=f"{gpu:.0f} % busy (mean)")
    worker = m.get("cpu_busiest_pct_worker", 0.0)
    if gpu is None and worker >= BUSY:
        return Limit(name="model compute (CPU worker)", evidence=f"worker process at {worker:.0f} % of a core")
    engine = m.get("cpu_busiest_pct_engine_core")
    if engine is not None and engine >= BUSY:
        return Limit(name="engine core", evidence=f"engine-core process at {engine:.0f} % of a core "
                     "(scheduling / step overhead)")
    if engine is not None and engine < 80 and (gpu if gpu is not None else 100.0) < 50:
        return Limit(name="engine core starved", evidence=f"engine core at {engine:.0f} % of a core with the GPU "
                     f"{_f(gpu)} % busy: other processes took its CPU")
    return Limit(name="undetermined", evidence="no part pegged; " + (_server_state(m) or "no server metrics"))


def limiting_factor(m: dict[str, float], min_goodput: float, steady=None, closed_loop: bool = False) -> str:
    """``limit`` as one line, "name: evidence" (what StepResult.limited_by holds)."""
    return str(limit(m, min_goodput, steady, closed_loop))
