"""The gateway's CPU cost: per non-streamed request and per relayed SSE event, from the gateway
process's own CPU time, so the figure holds on a busy machine (latency would not).

    flock /tmp/workbench-heavy.lock .venv/bin/python benchmarks/gateway_cpu.py             # ~5 min
    .venv/bin/python benchmarks/gateway_cpu.py --baseline-ref main    # before/after in one run: ~10 min
    .venv/bin/python benchmarks/gateway_cpu.py --baseline-ref A --baseline-ref B  # several, interleaved
    .venv/bin/python benchmarks/gateway_cpu.py --baseline-dir DIR --baseline-ref main  # DIR: its workbench/
    .venv/bin/python benchmarks/gateway_cpu.py --baseline-ref main --floor   # + the floor: bare relays
    .venv/bin/python benchmarks/gateway_cpu.py --pool A.json B.json   # several runs' repeats as one run

The gateway runs as its own process (``python -m workbench.gateway``: uvicorn + uvloop +
httptools) with everything on: key check, word filter on prompt and output (the shipped lists),
keyword moderation, metrics and the audit log (SQLite WAL). The upstream is the fake server
(workbench/testing/fakeserver.py), its own process. Clients keep ``--concurrency`` requests in flight.

One repeat = three closed-loop phases of ``--requests`` requests each, the CPU seconds of the
gateway (and of the fake upstream) read with psutil before and after each phase:

- ``plain``: non-streamed chat, 16 output tokens: gateway CPU per request;
- ``stream_short`` / ``stream_long``: streamed chat with ``--short`` and ``--long`` tokens, one
  SSE event per token written ``--itl-ms`` apart (as vLLM sends them: one event per read). The
  cost of one relayed event is the slope, (CPU per long stream - CPU per short stream) /
  (long - short), so the per-request part cancels.

Each figure is the mean over ``--repeats`` repeats with a 95 % t interval (scipy). The ratio is
gateway CPU / fake-upstream CPU for the same requests. With ``--baseline-ref REF`` the gateway at
git REF (extracted with ``git archive``) is measured too, interleaved repeat by repeat (A B A B),
against the same upstream, so before and after share the machine's state; ``--baseline-ref`` may
be given several times (A B C A B C), each compared with the current code. With ``--floor`` two
bare byte relays (benchmarks/bare_relay.py: uvloop protocols, one upstream connection per client
connection, no policy; ``floor:bare`` relays bytes only, ``floor:httptools`` also parses both
directions) run in the same rotation between the same clients and upstream, their CPU read the
same way: the floor of any Python/uvloop gateway with two sockets, and ``current - floor:*`` is
what the gateway's HTTP and policy layers cost above it. JSON goes to --out.
Goal (issue 14): <= 0.1 ms per non-streamed request, <= 5 us per relayed event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workbench.gateway.process import GatewayProcess  # noqa: E402
from workbench.net import ServerProcess, free_port as _free_port  # noqa: E402
from workbench.testing.fakeserver import FakeServerProcess  # noqa: E402
from workbench.gateway.keys import hash_key  # noqa: E402

KEY = "wb-bench-key"
PROMPT = "Write a short poem about the sea, please. " * 4


def gateway_config(upstream: str, tmp: Path, port: int, tag: str) -> Path:
    """The shipped defaults with everything on; only keys and paths that every version knows."""
    cfg = {"host": "127.0.0.1", "port": port,
           "upstreams": {"fake-model": {"base_url": upstream}},
           "keys": [{"id": "bench", "sha256": hash_key(KEY)}],
           "filter": {"word_lists": [str(ROOT / "data/gateway/sensitive_words.en.txt"),
                                     str(ROOT / "data/gateway/sensitive_words.zh.txt")], "output": True},
           "moderation": {"policy": "keyword", "before": True,
                          "patterns": [r"\bhow (do|to) (i )?make (a )?(bomb|explosive)s?\b"]},
           "audit": {"path": str(tmp / f"audit-{tag}.sqlite")}}
    path = tmp / f"gateway-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class GatewayProc(GatewayProcess):
    """The gateway of the checkout at ``code_root`` (its own workbench/ first on PYTHONPATH)."""

    def __init__(self, config: Path, port: int, code_root: Path):
        super().__init__(config, port, name=f"gateway from {code_root}", cwd=code_root,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(  # this checkout first
                             [str(code_root), *filter(None, [os.environ.get("PYTHONPATH")])])}, timeout_s=15, interval_s=0.05,
                         grace_s=20)
        self.code_root = code_root

    def __enter__(self) -> "GatewayProc":
        super().__enter__()
        self.ps = psutil.Process(self.proc.pid)
        return self


class RelayProc(ServerProcess):
    """benchmarks/bare_relay.py in front of the upstream (ready when its /health is relayed)."""

    def __init__(self, port: int, upstream: str, parse: bool):
        host_port = upstream.split("//", 1)[1].split("/", 1)[0]
        super().__init__([sys.executable, str(ROOT / "benchmarks/bare_relay.py"), "--port", str(port),
                          "--upstream", host_port, *(["--parse"] if parse else [])], port,
                         name="bare relay", timeout_s=15, interval_s=0.05)

    def __enter__(self) -> "RelayProc":
        super().__enter__()
        self.ps = psutil.Process(self.proc.pid)
        return self


FLOORS = {"floor:bare": False, "floor:httptools": True}  # name -> parse with httptools


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def main_thread_s(p: psutil.Process) -> float:
    """CPU seconds of the process's main thread (its thread id is the pid on Linux), 0 elsewhere."""
    return next((t.user_time + t.system_time for t in p.threads() if t.id == p.pid), 0.0)


async def closed_loop(url: str, body: bytes, n: int, concurrency: int, events: int | None) -> None:
    """n requests, concurrency in flight; each reply read to the end and checked."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    left = n

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                async with s.post(url, data=body, headers=headers) as r:
                    data = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
                    got = data.count(b"\n\n")
                    if events is not None and got < events:
                        raise RuntimeError(f"stream cut short: {got} events")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def body(stream: bool, tokens: int) -> bytes:
    return json.dumps({"model": "fake-model", "max_tokens": tokens, "stream": stream,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()


async def phase(gw: GatewayProc, fake_ps: psutil.Process, stream: bool, tokens: int, a) -> dict:
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    b = body(stream, tokens)
    await closed_loop(url, b, a.concurrency * 4, a.concurrency, None)  # warm: connections, caches
    g0, f0, m0 = cpu_s(gw.ps), cpu_s(fake_ps), main_thread_s(gw.ps)
    t0 = time.perf_counter()
    await closed_loop(url, b, a.requests, a.concurrency, tokens if stream else None)
    wall = time.perf_counter() - t0
    g, f, m = cpu_s(gw.ps) - g0, cpu_s(fake_ps) - f0, main_thread_s(gw.ps) - m0
    return {"gateway_cpu_ms_per_request": g / a.requests * 1000, "upstream_cpu_ms_per_request": f / a.requests * 1000,
            # the event loop's thread; the rest is the audit writer's and other threads' (cProfile sees only this one)
            "gateway_main_thread_cpu_ms_per_request": m / a.requests * 1000,
            "req_per_s": a.requests / wall, "gateway_cpu_util": g / wall}


def interval(xs: list[float]) -> dict:
    x = np.asarray(xs, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return {"mean": m, "ci95": [m, m], "n": len(x)}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": round(m, 5), "ci95": [round(m - half, 5), round(m + half, 5)], "n": len(x),
            "values": [round(float(v), 5) for v in x]}


def summarize(reps: list[dict], a) -> dict:
    plain = [r["plain"]["gateway_cpu_ms_per_request"] for r in reps]
    up = [r["plain"]["upstream_cpu_ms_per_request"] for r in reps]
    short = [r["stream_short"]["gateway_cpu_ms_per_request"] for r in reps]
    long_ = [r["stream_long"]["gateway_cpu_ms_per_request"] for r in reps]
    per_event_us = [(lg - sh) * 1000 / (a.long - a.short) for lg, sh in zip(long_, short)]
    up_long = [r["stream_long"]["upstream_cpu_ms_per_request"] for r in reps]
    return {
        "gateway_cpu_ms_per_request": interval(plain),
        "gateway_cpu_us_per_event": interval(per_event_us),
        "gateway_cpu_ms_per_stream_short": interval(short),
        "gateway_cpu_ms_per_stream_long": interval(long_),
        "upstream_cpu_ms_per_request": interval(up),
        "ratio_gateway_to_upstream_cpu": interval([g / u for g, u in zip(plain, up)]),
        "ratio_gateway_to_upstream_cpu_long_stream": interval([g / u for g, u in zip(long_, up_long)]),
        "goal": {"ms_per_request": 0.1, "us_per_event": 5.0},
    }


def compare(baseline: list[dict], current: list[dict], a) -> dict:
    """Paired by repeat (each pair ran back to back): current - baseline, with a t interval."""
    def per_event(r):
        return (r["stream_long"]["gateway_cpu_ms_per_request"]
                - r["stream_short"]["gateway_cpu_ms_per_request"]) * 1000 / (a.long - a.short)
    plain = [c["plain"]["gateway_cpu_ms_per_request"] - b["plain"]["gateway_cpu_ms_per_request"]
             for b, c in zip(baseline, current)]
    event = [per_event(c) - per_event(b) for b, c in zip(baseline, current)]
    ratio = [c["plain"]["gateway_cpu_ms_per_request"] / b["plain"]["gateway_cpu_ms_per_request"]
             for b, c in zip(baseline, current)]
    ratio_event = [per_event(c) / per_event(b) for b, c in zip(baseline, current)]
    return {"delta_gateway_cpu_ms_per_request": interval(plain), "delta_gateway_cpu_us_per_event": interval(event),
            "ratio_gateway_cpu_per_request": interval(ratio), "ratio_gateway_cpu_per_event": interval(ratio_event)}


def extract(ref: str, dest: Path) -> Path:
    data = subprocess.run(["git", "archive", ref, "workbench"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


async def main_async(a) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    except OSError:  # no git (a copy of the tree): $GIT_SHA says which commit it is
        sha = ""
    sha = sha or os.environ.get("GIT_SHA", "")
    results = {"schema_version": 1, "benchmark": "gateway_cpu", "git_sha": sha,
               "config": {k: v for k, v in vars(a).items() if k != "out"},
               "platform": {"python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count()}, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp, FakeServerProcess(
            output_tokens=max(a.long, 16), itl_ms=a.itl_ms) as fake:
        tmp = Path(tmp)
        variants = {"current": ROOT}
        if a.baseline_dir:  # a folder holding the baseline's workbench/ (where git is not at hand)
            variants = {f"baseline:{a.baseline_ref[0] if a.baseline_ref else 'dir'}": Path(a.baseline_dir).resolve(),
                        **variants}
        elif a.baseline_ref:
            variants = {**{f"baseline:{ref}": extract(ref, tmp / f"baseline{i}") for i, ref in enumerate(a.baseline_ref)},
                        **variants}
        if a.floor:
            variants.update({name: None for name in FLOORS})
        fake_ps = psutil.Process(fake.proc.pid)
        reps: dict[str, list] = {v: [] for v in variants}
        for i in range(a.repeats):
            for name, code in variants.items():  # interleaved: A B A B
                port = _free_port("127.0.0.1")
                if code is None:  # a floor
                    proc = RelayProc(port, fake.base_url, FLOORS[name])
                else:
                    cfg = gateway_config(fake.base_url, tmp, port, f"{len(reps[name])}-{name.split(':')[0]}")
                    proc = GatewayProc(cfg, port, code)
                with proc as gw:
                    rep = {"plain": await phase(gw, fake_ps, False, 16, a),
                           "stream_short": await phase(gw, fake_ps, True, a.short, a),
                           "stream_long": await phase(gw, fake_ps, True, a.long, a)}
                reps[name].append(rep)
                print(f"repeat {i + 1}/{a.repeats} {name}: {rep['plain']['gateway_cpu_ms_per_request']:.3f} ms/req, "
                      f"streams {rep['stream_short']['gateway_cpu_ms_per_request']:.3f} / "
                      f"{rep['stream_long']['gateway_cpu_ms_per_request']:.3f} ms", file=sys.stderr)
        for name in variants:
            results["variants"][name] = {"summary": summarize(reps[name], a), "repeats": reps[name]}
        bases = [v for v in reps if v.startswith("baseline:")]
        if bases:  # the first baseline here, every one under "comparisons"
            results["current_minus_baseline"] = compare(reps[bases[0]], reps["current"], a)
            results["comparisons"] = {f"current - {b}": compare(reps[b], reps["current"], a) for b in bases}
        for name in FLOORS if a.floor else ():  # what the gateways cost above the floor
            results.setdefault("comparisons", {}).update(
                {f"{v} - {name}": compare(reps[name], reps[v], a) for v in reps if v not in FLOORS})
    return results


def pool(paths: list[str], a) -> dict:
    """Several runs' JSON (the same variants, stream lengths and code) as one: their repeats in
    one list per variant, summarized and compared (paired within each run) as one run's are."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    a.short, a.long = runs[0]["config"]["short"], runs[0]["config"]["long"]
    reps = {v: [r for run in runs for r in run["variants"][v]["repeats"]] for v in runs[0]["variants"]}
    out = {"pooled": [str(p) for p in paths], "variants": {v: {"summary": summarize(r, a)} for v, r in reps.items()}}
    out["comparisons"] = {f"current - {b}": compare(reps[b], reps["current"], a) for b in reps if b.startswith("baseline:")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per phase")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--short", type=int, default=8, help="tokens (events) of a short stream")
    p.add_argument("--long", type=int, default=64, help="tokens (events) of a long stream")
    p.add_argument("--itl-ms", type=float, default=1.0, help="fake upstream delay between events")
    p.add_argument("--baseline-ref", action="append", default=None,
                   help="also measure the gateway at this git ref (repeatable)")
    p.add_argument("--baseline-dir", default=None,
                   help="the baseline's code: a folder with its workbench/ (e.g. `git archive main workbench`)")
    p.add_argument("--floor", action="store_true",
                   help="also measure the bare relays of benchmarks/bare_relay.py (the floor), interleaved")
    p.add_argument("--out", default=str(ROOT / "results/benchmarks/gateway_cpu.json"))
    p.add_argument("--pool", nargs="+", default=None, metavar="JSON",
                   help="no run: pool these runs' repeats (same variants and code) and print them as one run's")
    a = p.parse_args()
    if a.pool:
        res = pool(a.pool, a)
        for name, c in [*((v, s["summary"]) for v, s in res["variants"].items()), *res["comparisons"].items()]:
            print(name, json.dumps({k: (v["mean"], v["ci95"], v["n"]) for k, v in c.items() if isinstance(v, dict) and "mean" in v}))
        return
    results = asyncio.run(main_async(a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, v in results["variants"].items():
        s = v["summary"]
        print(f"{name}: {s['gateway_cpu_ms_per_request']['mean']:.3f} ms/request "
              f"{s['gateway_cpu_ms_per_request']['ci95']}, {s['gateway_cpu_us_per_event']['mean']:.2f} us/event "
              f"{s['gateway_cpu_us_per_event']['ci95']}, ratio to upstream "
              f"{s['ratio_gateway_to_upstream_cpu']['mean']:.2f}")
    for name, c in results.get("comparisons", {}).items():
        d, e = c["delta_gateway_cpu_ms_per_request"], c["delta_gateway_cpu_us_per_event"]
        print(f"{name}: {d['mean']:+.3f} ms/request {d['ci95']}, {e['mean']:+.2f} us/event {e['ci95']}")
    print(f"written to {Path(a.out).relative_to(ROOT) if Path(a.out).is_relative_to(ROOT) else a.out}")


if __name__ == "__main__":
    main()
