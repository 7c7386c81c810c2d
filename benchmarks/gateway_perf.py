"""Where the gateway's CPU goes without a profiler inside it: ``perf record`` samples the gateway
process (all its threads, user and kernel stacks) under the same closed-loop load as
benchmarks/gateway_cpu.py, and this script groups the samples by layer (kernel, libpython's
eval loop, uvloop, httptools, orjson, zlib, sqlite, ...) from each sample's leaf DSO and symbol.
cProfile (benchmarks/gateway_profile.py) slows Python ~4x and hides C and kernel time; perf
does neither, but sees Python only as libpython (3.11 has no perf trampolines).

    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_perf.py --kind plain --requests 4000
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_perf.py --kind stream --tokens 64 --requests 600
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_perf.py --code DIR   # another checkout
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_perf.py --py-spy PATH/py-spy  # Python frames
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_perf.py --freq 0 --set audit.batch_wait_s=0.05

Needs ``perf`` on PATH and permission to sample the process (root or perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from gateway_cpu import GatewayProc, body, closed_loop, cpu_s, gateway_config  # noqa: E402
from workbench.net import free_port  # noqa: E402
from workbench.testing.fakeserver import FakeServerProcess  # noqa: E402

log = logging.getLogger("gateway_perf")

# Leaf DSO (or symbol prefix) -> layer; first match wins. "[kernel" catches perf's kernel DSO names.
LAYERS = (("[kernel", "kernel (syscalls, TCP loopback, epoll, scheduler)"),
          ("[vdso]", "kernel (syscalls, TCP loopback, epoll, scheduler)"),
          ("uvloop", "uvloop (event loop, transports)"), ("httptools", "httptools (HTTP parsing)"),
          ("orjson", "orjson"), ("libz", "zlib (gzip)"), ("zlib", "zlib (gzip)"),
          ("sqlite", "sqlite (audit writer)"), ("ahocorasick", "ahocorasick (word filter)"),
          ("_re", "re"), ("libpython", "libpython (eval loop, objects, GC)"),
          ("python3", "libpython (eval loop, objects, GC)"),
          ("libc", "libc (malloc, memcpy, locks)"), ("libm", "libc (malloc, memcpy, locks)"))


def layer(dso: str) -> str:
    return next((name for part, name in LAYERS if part in dso), f"other ({Path(dso).name})")


def samples(data: Path, pid: int) -> tuple[Counter, Counter, Counter]:
    """Each sample's leaf frame (dso, symbol) and thread (main: the event loop; other: audit
    writer and helpers), from ``perf script``'s blocks: a header line, then the call chain."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout
    by_layer, by_sym, by_thread = Counter(), Counter(), Counter()
    for block in out.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        thread = "main (event loop)" if lines[0].split()[0] == str(pid) else "other threads (audit writer, ...)"
        # leaf: "addr sym+off (dso)"
        _, _, rest = lines[1].partition(" ")
        sym, _, dso = rest.rpartition(" (")
        dso = dso.rstrip(")")
        by_layer[layer(dso)] += 1
        by_sym[f"{sym.split('+')[0][:60]} [{Path(dso).name}]"] += 1
        by_thread[thread] += 1
        if not thread.startswith("main"):
            by_thread[f"  {thread[:13]}: {layer(dso)}"] += 1
    return by_layer, by_sym, by_thread


PY_GROUPS = (("Runner.run (asyncio", "event loop (uvloop C: epoll, recv, callbacks)"),
             ("(uvicorn/", "uvicorn"), ("(prometheus_client", "prometheus_client"), ("(asyncio/", "asyncio"),
             ("(workbench/gateway/audit", "audit writer (Python + sqlite3)"),
             ("HeadHeld.write (", "send to the client (uvloop write, kernel)"),
             ("ChunkWriter.", "send to the client (uvloop write, kernel)"),
             ("Client.request (", "send to the upstream (uvloop write, kernel)"),
             ("(workbench/gateway/", "workbench.gateway"), ("(fastjsonschema", "fastjsonschema"),
             ("(<string>", "fastjsonschema"), ("(hmac", "hmac (audit prompt hash)"))


def pyspy_stacks(raw: Path) -> tuple[Counter, Counter, Counter]:
    """py-spy's collapsed stacks (``frame;frame;... count``, frames ``func (file:line)``):
    self samples by the leaf frame's group and function, and inclusive samples by function."""
    by_group, by_leaf, incl = Counter(), Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        k = int(count)
        leaf = frames[-1]
        by_group[next((g for part, g in PY_GROUPS if part in leaf), "other Python")] += k
        by_leaf[leaf.split(":")[0][:90]] += k
        for f in {fr.split(":")[0] for fr in frames}:
            incl[f[:90]] += k
    return by_group, by_leaf, incl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["plain", "stream"], default="plain")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--itl-ms", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--freq", type=int, default=2000, help="samples per second per CPU (0: no sampler, CPU time only)")
    p.add_argument("--code", default=str(ROOT))
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                   help="override a gateway config key, e.g. audit.batch_wait_s=0.05")
    p.add_argument("--py-spy", default=None, help="sample with this py-spy binary instead of perf (Python frames)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stream = a.kind == "stream"
    with tempfile.TemporaryDirectory() as tmp, FakeServerProcess(
            output_tokens=max(16, a.tokens), itl_ms=a.itl_ms) as fake:
        tmp, port = Path(tmp), free_port()
        cfg = gateway_config(fake.base_url, tmp, port, "perf")
        if a.set:
            doc = yaml.safe_load(cfg.read_text())
            for item in a.set:
                key, _, value = item.partition("=")
                section, _, name = key.partition(".")
                doc.setdefault(section, {})[name] = yaml.safe_load(value)
            cfg.write_text(yaml.safe_dump(doc))
        with GatewayProc(cfg, port, Path(a.code)) as gw:
            pid = gw.proc.pid
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            b = body(stream, a.tokens)
            asyncio.run(closed_loop(url, b, 300, a.concurrency, None))  # warm-up
            data = tmp / "perf.data"
            cmd = ([a.py_spy, "record", "-r", str(a.freq), "-f", "raw", "--nonblocking", "--threads", "-p",
                    str(pid), "-o", str(data)] if a.py_spy else
                   ["perf", "record", "-q", "-F", str(a.freq), "-e", "cpu-clock", "-g", "-p", str(pid), "-o", str(data)])
            rec = subprocess.Popen(cmd if a.freq else ["sleep", "600"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            c0 = cpu_s(gw.ps)
            asyncio.run(closed_loop(url, b, a.requests, a.concurrency, a.tokens if stream else None))
            cpu = cpu_s(gw.ps) - c0
            rec.send_signal(2)
            rec.wait(60)
        by_layer, by_sym, by_thread = (Counter(), Counter(), Counter()) if not a.freq else \
            pyspy_stacks(data) if a.py_spy else samples(data, pid)
    n = sum(by_layer.values()) or 1
    unit, per = ("event", a.requests * a.tokens) if stream else ("request", a.requests)
    us = cpu / per * 1e6
    log.info("gateway CPU %.3f s for %d %ss: %.1f us per %s (process CPU, perf attached)", cpu, per, unit, us, unit)
    for name, k in by_layer.most_common():
        log.info("%-55s %5.1f %%  ~%6.2f us/%s", name, 100 * k / n, us * k / n, unit)
    if a.py_spy:  # third counter: inclusive samples by function
        for name, k in by_thread.most_common(a.top):
            log.info("  incl %5.1f %%  %s", 100 * k / n, name)
    else:
        log.info("threads: %s", {t: f"{100 * k / n:.1f} %" for t, k in by_thread.most_common()})
    for name, k in by_sym.most_common(a.top):
        log.info("  %5.1f %%  %s", 100 * k / n, name)
    if a.out:
        Path(a.out).write_text(json.dumps({
            "kind": a.kind, "requests": a.requests, "tokens": a.tokens, "itl_ms": a.itl_ms,
            "cpu_s": cpu, f"cpu_us_per_{unit}": us, "samples": n,
            "share_by_layer": {k: v / n for k, v in by_layer.items()},
            ("inclusive_share" if a.py_spy else "share_by_thread"):
                {k: v / n for k, v in by_thread.most_common(a.top if a.py_spy else None)},
            "top_symbols": {k: v / n for k, v in by_sym.most_common(a.top)}}, indent=1))


if __name__ == "__main__":
    main()
