"""One open-loop step spread over several client processes, for rates one Python process can't drive.

A single asyncio process parses every SSE event of every stream; at a few hundred streamed req/s
on a GPU that process, not the server, becomes the limit (its send lag grows, TTFT inflates).
Here the step's schedule is fixed first, exactly as for one process, then request ``i`` goes to
process ``i % n``. Every process waits for one shared start time on the wall clock and runs
``client.run_step`` on its share; the records come back re-based onto that shared zero, so the
merged step reads as if one client had sent it (same ids, same warm-up marks, same metrics).

Processes are spawned (never forked: the caller may be a Jupyter kernel with a running loop).
``max_concurrency``, when set, is split evenly between processes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from dataclasses import replace

from workbench.loadgen.client import Record, Target
from workbench.loadgen.workloads import RequestSpec

log = logging.getLogger(__name__)
START_DELAY_S = 0.5  # from the last process reporting ready to the shared zero
READY_TIMEOUT_S = 120


def _worker(conn, target: Target, specs: list[RequestSpec], offsets: list[float], step: str,
            max_concurrency: int | None, timeout_s: float) -> None:
    """In the child: ready -> wait for the shared zero -> run the share -> send records back."""
    from workbench.loadgen.client import START_LEAD_S, make_session, run_async, run_step

    try:
        conn.send("ready")
        t_zero_unix = conn.recv()

        async def go() -> list[Record]:
            async with make_session(timeout_s) as session:
                # run_step's zero is now + START_LEAD_S; shift the schedule to land on t_zero_unix.
                shift = t_zero_unix - (time.time() + START_LEAD_S)
                recs = await run_step(session, target, specs, [o + shift for o in offsets], step,
                                      0, max_concurrency)
                return [_rebase(r, shift, t_zero_unix) for r in recs]

        conn.send(("ok", run_async(go())))
    except BaseException as err:  # the parent turns it into an error naming the process
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def _rebase(r: Record, shift: float, t_zero_unix: float) -> Record:
    """Times relative to the process's own zero (``shift`` before the shared one) -> relative to
    the shared zero."""
    def s(v: float | None) -> float | None:
        return None if v is None else v - shift

    return replace(r, scheduled_s=r.scheduled_s - shift, send_s=s(r.send_s),
                   first_token_s=s(r.first_token_s), chunk_s=[c - shift for c in r.chunk_s],
                   end_s=s(r.end_s), t0_unix=t_zero_unix)


def run_step_processes(target: Target, specs: list[RequestSpec], offsets: list[float], step: str,
                       warmup: int, max_concurrency: int | None, processes: int,
                       timeout_s: float) -> list[Record]:
    """``client.run_step`` over ``processes`` spawned clients; records in schedule order."""
    if len(specs) != len(offsets):
        raise ValueError("one offset per request")
    n = max(1, min(processes, len(specs)))
    shares = [list(range(k, len(specs), n)) for k in range(n)]
    per_proc_cap = math.ceil(max_concurrency / n) if max_concurrency else None
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for k, idx in enumerate(shares):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, name=f"loadgen-{k}", daemon=True,
                        args=(child, target, [specs[i] for i in idx], [offsets[i] for i in idx],
                              step, per_proc_cap, timeout_s))
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    try:
        for k, c in enumerate(conns):
            if not c.poll(READY_TIMEOUT_S) or c.recv() != "ready":
                raise RuntimeError(f"load-generator process {k} did not start")
        t_zero = time.time() + START_DELAY_S
        for c in conns:
            c.send(t_zero)
        records: list[Record | None] = [None] * len(specs)
        for k, (c, idx) in enumerate(zip(conns, shares)):
            status, payload = c.recv()  # blocks until that share's last response (or its timeout)
            if status != "ok":
                raise RuntimeError(f"load-generator process {k} failed: {payload}")
            for i, rec in zip(idx, payload):
                records[i] = replace(rec, request_id=f"{step}-{i}", warmup=i < warmup)
        return records  # type: ignore[return-value]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
