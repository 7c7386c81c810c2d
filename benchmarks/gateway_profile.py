"""Where the gateway's CPU goes: cProfile of a gateway process under a closed-loop load, grouped by
component (event loop, uvicorn, aiohttp, our code, C calls), the "which part is the floor" view
that benchmarks/gateway_cpu.py's totals do not give. cProfile slows Python code more than C, so
read the shares as an upper bound on our code's part, not as timings. The profiler's clock is the
process's CPU time (``--timer cpu``, the default): with ``--timer wall`` (``python -m cProfile``'s
clock) the event loop's own time also holds the time the process sat idle in epoll, which for
a stream of events 1 ms apart is most of it (rounds 1-3 read their "event loop" share that way).

    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_profile.py --kind plain    # ~30 s
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_profile.py --kind stream --top 40
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_profile.py --kind stream --tokens 64 --itl-ms 1 --requests 1000
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_profile.py --code DIR  # DIR: another workbench/'s parent

Config as in gateway_cpu.py (filter on prompt and output, keyword moderation, audit on); the
upstream is the fake server in its own process; 3,000 requests, 16 in flight, 16 tokens each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pstats
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workbench.gateway.keys import hash_key  # noqa: E402
from workbench.net import free_port, wait_http_ok  # noqa: E402
from workbench.testing.fakeserver import FakeServerProcess  # noqa: E402

log = logging.getLogger("gateway_profile")
KEY = "wb-bench-key"
GROUPS = (("/uvicorn/", "uvicorn (server protocol)"), ("/aiohttp/", "aiohttp (upstream client)"),
          ("/multidict", "aiohttp (upstream client)"), ("/yarl/", "aiohttp (upstream client)"),
          ("/workbench/gateway/client.py", "native upstream client (client.py)"),
          ("/workbench/gateway/reply.py", "native upstream client (client.py)"),
          ("/httptools/", "native upstream client (client.py)"),
          ("/workbench/", "workbench.gateway (our Python)"), ("prometheus", "prometheus_client"),
          ("/asyncio/", "asyncio (Python)"))


# The gateway under cProfile with the chosen clock: argv is TIMER PROF_PATH GATEWAY_ARGS...
LAUNCH = """
import cProfile, runpy, sys, time
timer, out = sys.argv[1], sys.argv[2]
sys.argv = ["workbench.gateway", *sys.argv[3:]]
prof = cProfile.Profile(time.process_time) if timer == "cpu" else cProfile.Profile()
try:
    prof.runcall(runpy.run_module, "workbench.gateway", run_name="__main__", alter_sys=True)
finally:
    prof.dump_stats(out)
"""


async def load(url: str, n: int, conc: int, stream: bool, tokens: int = 16) -> None:
    body = {"model": "fake-model", "max_tokens": tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Write a short poem about the sea, please. " * 4}]}
    sem = asyncio.Semaphore(conc)
    async with aiohttp.ClientSession() as s:
        async def one():
            async with sem, s.post(url + "/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as r:
                await r.read()
        await asyncio.gather(*(one() for _ in range(n)))


def group(stats: pstats.Stats) -> dict[str, float]:
    """Own time (tottime) per component, seconds."""
    out: dict[str, float] = {}
    for (file, _, fn), (_, _, tt, _, _) in stats.stats.items():
        if file.endswith("runners.py") and fn == "run":
            key = "event loop (uvloop, in C: I/O, callbacks)"
        elif file == "~":
            key = "C calls (orjson, ahocorasick, re, sockets, hashing)"
        else:
            key = next((name for part, name in GROUPS if part in file), "other (start-up imports, stdlib)")
        out[key] = out.get(key, 0.0) + tt
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["plain", "stream"], default="plain")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--out", default=None, help="JSON of the grouped shares (default: print only)")
    p.add_argument("--top", type=int, default=0, help="also log the N functions with the most own time")
    p.add_argument("--code", default=str(ROOT), help="the checkout whose gateway runs (its workbench/ first)")
    p.add_argument("--tokens", type=int, default=16, help="output tokens (stream: events) per request")
    p.add_argument("--itl-ms", type=float, default=0.0,
                   help="fake upstream delay between events (0: a reply arrives in one read; 1: one event per read)")
    p.add_argument("--timer", choices=["cpu", "wall"], default="cpu",
                   help="the profiler's clock: process CPU time, or wall time (idle waits counted)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp, FakeServerProcess(
            output_tokens=max(16, a.tokens), itl_ms=a.itl_ms) as fake:
        tmp, port = Path(tmp), free_port()
        cfg = {"host": "127.0.0.1", "port": port, "upstreams": {"fake-model": {"base_url": fake.base_url}},
               "keys": [{"id": "bench", "sha256": hash_key(KEY)}],
               "filter": {"word_lists": [str(ROOT / "data/gateway/sensitive_words.en.txt"),
                                         str(ROOT / "data/gateway/sensitive_words.zh.txt")], "output": True},
               "moderation": {"policy": "keyword", "patterns": [r"\bhow (do|to) (i )?make (a )?(bomb|explosive)s?\b"]},
               "audit": {"path": str(tmp / "audit.sqlite")}}
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(cfg))
        prof = tmp / "gateway.prof"
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, a.timer, str(prof),
                                 "--config", str(tmp / "gateway.yaml")], env={**os.environ, "PYTHONPATH": a.code},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http_ok(f"http://127.0.0.1:{port}/health", 60, proc)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, 300, 8, False))  # warm-up
        asyncio.run(load(url, a.requests, 16, a.kind == "stream", a.tokens))
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        stats = pstats.Stats(str(prof))
        shares = group(stats)
        if a.top:
            stats.sort_stats("tottime").print_stats(a.top)
    total = sum(shares.values())
    for name, sec in sorted(shares.items(), key=lambda kv: -kv[1]):
        log.info("%-55s %6.2f s  %5.1f %%", name, sec, 100 * sec / total)
    if a.out:
        Path(a.out).write_text(json.dumps({"kind": a.kind, "requests": a.requests, "tokens": a.tokens,
                                           "itl_ms": a.itl_ms, "timer": a.timer, "seconds_by_component": shares}, indent=1))


if __name__ == "__main__":
    main()
