"""Where a relayed event's and a request's CPU goes, by kind: user against kernel time (psutil)
and the system calls, context switches and thread hand-offs (``perf stat`` tracepoints), per
request, for the gateway and the bare relay (benchmarks/bare_relay.py) under the load of
benchmarks/gateway_cpu.py (same config, clients and fake upstream); per event as the slope
between a short and a long stream, as gateway_cpu.py reads it.

    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_syscalls.py            # ~3 min
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_syscalls.py --code DIR # another checkout
    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_syscalls.py --no-perf  # CPU split only

``perf stat`` counts (it does not sample), so it barely slows the process; strace would (it stops
the process at every call and changes how events batch into reads). Needs ``perf`` on PATH and
permission to trace the process (root or perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from gateway_cpu import GatewayProc, RelayProc, body, closed_loop, gateway_config  # noqa: E402
from workbench.net import free_port  # noqa: E402
from workbench.testing.fakeserver import FakeServerProcess  # noqa: E402

CALLS = ("read", "write", "epoll_pwait", "epoll_ctl", "futex", "getpid", "pwrite64", "fdatasync", "fcntl")
EVENTS = [f"syscalls:sys_enter_{c}" for c in CALLS] + ["context-switches", "cpu-migrations"]


def perf_counts(path: Path) -> dict[str, float]:
    """``perf stat -x,`` output: value, unit, event name, ..."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 3 and parts[0].replace(".", "").isdigit():
            out[parts[2].replace("syscalls:sys_enter_", "")] = float(parts[0])
    return out


async def phase(proc, url: str, stream: bool, tokens: int, a, tmp: Path) -> dict:
    b = body(stream, tokens)
    await closed_loop(url, b, a.concurrency * 4, a.concurrency, None)  # warm
    stat = None
    if a.perf:
        stat = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(EVENTS), "-p", str(proc.proc.pid),
                                 "-o", str(tmp / "stat.txt")], stderr=subprocess.DEVNULL)
        await asyncio.sleep(0.5)  # attached
    t0, c0 = time.perf_counter(), proc.ps.cpu_times()
    await closed_loop(url, b, a.requests, a.concurrency, tokens if stream else None)
    wall, c1 = time.perf_counter() - t0, proc.ps.cpu_times()
    n = a.requests
    row = {"user_ms": (c1.user - c0.user) / n * 1e3, "sys_ms": (c1.system - c0.system) / n * 1e3,
           "req_per_s": n / wall}
    if stat is not None:
        stat.send_signal(signal.SIGINT)
        stat.wait()
        row["per_request"] = {k: v / n for k, v in perf_counts(tmp / "stat.txt").items()}
    return row


async def main_async(a) -> dict:
    out: dict = {"benchmark": "gateway_syscalls", "config": {k: v for k, v in vars(a).items() if k != "out"},
                 "targets": {}}
    with tempfile.TemporaryDirectory() as tmp, FakeServerProcess(output_tokens=max(a.long, 16),
                                                                 itl_ms=a.itl_ms) as fake:
        tmp = Path(tmp)
        for target in ("gateway", "floor:bare"):
            port = free_port("127.0.0.1")
            proc = RelayProc(port, fake.base_url, False) if target != "gateway" else GatewayProc(
                gateway_config(fake.base_url, tmp, port, "s"), port, Path(a.code).resolve())
            with proc:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                res = {"plain": await phase(proc, url, False, 16, a, tmp),
                       "stream_short": await phase(proc, url, True, a.short, a, tmp),
                       "stream_long": await phase(proc, url, True, a.long, a, tmp)}
            lo, hi, k = res["stream_short"], res["stream_long"], a.long - a.short
            res["per_event"] = {"user_us": (hi["user_ms"] - lo["user_ms"]) * 1e3 / k,
                                "sys_us": (hi["sys_ms"] - lo["sys_ms"]) * 1e3 / k}
            if "per_request" in hi:
                res["per_event"].update({name: (hi["per_request"].get(name, 0) - lo["per_request"].get(name, 0)) / k
                                         for name in hi["per_request"]})
            out["targets"][target] = res
            pe = res["per_event"]
            print(f"{target}: plain {res['plain']['user_ms']:.3f} user + {res['plain']['sys_ms']:.3f} sys ms/request; "
                  f"per event {pe['user_us']:.1f} user + {pe['sys_us']:.1f} sys us", file=sys.stderr)
            for kind in ("plain", "per_event"):
                counts = res[kind].get("per_request", {}) if kind == "plain" else {
                    k: v for k, v in res[kind].items() if not k.endswith("_us")}
                if counts:
                    print(f"  {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in counts.items()), file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per phase")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=64)
    p.add_argument("--itl-ms", type=float, default=1.0)
    p.add_argument("--code", default=str(ROOT), help="the gateway's checkout (its workbench/)")
    p.add_argument("--no-perf", dest="perf", action="store_false", help="CPU split only, no perf stat")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res = asyncio.run(main_async(a))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
