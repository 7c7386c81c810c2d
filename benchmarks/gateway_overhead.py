"""What the gateway adds: latency and throughput through it vs straight to the upstream.

    flock /tmp/workbench-heavy.lock .venv/bin/python benchmarks/gateway_overhead.py          # ~3 min
    .venv/bin/python benchmarks/gateway_overhead.py --requests 300 --seconds 3 --profiles bare

The upstream is the fake server (workbench/testing/fakeserver.py, its own process, TTFT = ITL =
0, 16 output tokens), so everything beyond the direct numbers is the gateway's. The gateway runs as
its own process (`python -m workbench.gateway`, uvicorn + uvloop + httptools), once per profile:

- full: the defaults: key check, word filter on prompt and output (shipped lists), keyword
  moderation, metrics, audit log (SQLite WAL, synchronous=FULL);
- bare: key check and metrics only (filter, moderation and audit off): the proxy's own cost.

For each profile, non-streaming and streaming chat:
1. latency: --requests sequential requests, alternating direct / gateway so both see the same
   machine; added p50 / p99 = gateway percentile - direct percentile (streams: to the last byte,
   and TTFT to the first byte);
2. throughput: closed loop with --concurrency in flight for --seconds, direct then gateway twice;
   ratio = gateway req/s / direct req/s; plus the gateway's CPU seconds per request.

Targets (the issue's): <= 1 ms added p50, <= 5 ms p99, >= 90 % of direct throughput. With
``--ttft-ms 20 --itl-ms 5`` the upstream behaves like a small model on a GPU and the throughput
ratio shows what a real deployment sees. A third
section measures the word filter alone: automaton memory and per-request cost with the shipped
lists and with 10,000 words. JSON goes to --out; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workbench.gateway.keys import hash_key  # noqa: E402
from workbench.reports import cpu_info, provenance  # noqa: E402
from workbench.gateway.process import GatewayProcess  # noqa: E402
from workbench.net import free_port  # noqa: E402
from workbench.testing.fakeserver import FakeServerProcess  # noqa: E402

KEY = "wb-bench-key"
BODY = {"model": "fake-model", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Write a short poem about the sea, please. " * 4}]}
PROFILES = {
    "full": {},
    "bare": {"filter": {"enabled": False}, "moderation": {"policy": None}, "audit": {"enabled": False}},
}


def gateway_config(profile: str, upstream: str, tmp: Path, port: int) -> Path:
    cfg = {"host": "127.0.0.1", "port": port,
           "upstreams": {"fake-model": {"base_url": upstream}},
           "keys": [{"id": "bench", "sha256": hash_key(KEY)}],
           "filter": {"word_lists": [str(ROOT / "data/gateway/sensitive_words.en.txt"),
                                     str(ROOT / "data/gateway/sensitive_words.zh.txt")]},
           "moderation": {"patterns": [r"\bhow (do|to) (i )?make (a )?(bomb|explosive)s?\b"]},
           "audit": {"path": str(tmp / f"audit-{profile}.sqlite")}}
    for section, values in PROFILES[profile].items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp / f"gateway-{profile}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Gateway(GatewayProcess):
    def __init__(self, config: Path, port: int):
        super().__init__(config, port, cwd=ROOT, timeout_s=30, interval_s=0.05, grace_s=15)

    def __enter__(self):
        super().__enter__()
        self.ps = psutil.Process(self.proc.pid)
        return self

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the last) for one request."""
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as r:
        first = None
        async for _ in r.content.iter_any():
            if first is None:
                first = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return first or 0.0, time.perf_counter() - t0


def pct_ms(xs: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(xs) * 1000, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


async def latency(direct: str, via: str, stream: bool, n: int) -> dict:
    body = json.dumps({**BODY, "stream": stream}).encode()
    hd = {"Content-Type": "application/json"}
    hg = {**hd, "Authorization": f"Bearer {KEY}"}
    out = {"direct": ([], []), "gateway": ([], [])}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as s:
        for _ in range(50):  # warm-up: connections, caches
            await one(s, direct, body, hd)
            await one(s, via, body, hg)
        for _ in range(n):
            for name, url, h in (("direct", direct, hd), ("gateway", via, hg)):
                ttft, e2e = await one(s, url, body, h)
                out[name][0].append(ttft)
                out[name][1].append(e2e)
    res = {name: {"e2e": pct_ms(v[1]), **({"ttft": pct_ms(v[0])} if stream else {})} for name, v in out.items()}
    res["added_p50_ms"] = round(res["gateway"]["e2e"]["p50_ms"] - res["direct"]["e2e"]["p50_ms"], 3)
    res["added_p99_ms"] = round(res["gateway"]["e2e"]["p99_ms"] - res["direct"]["e2e"]["p99_ms"], 3)
    if stream:
        res["added_ttft_p50_ms"] = round(res["gateway"]["ttft"]["p50_ms"] - res["direct"]["ttft"]["p50_ms"], 3)
    return res


async def closed_loop(url: str, headers: dict, stream: bool, concurrency: int, seconds: float) -> float:
    body = json.dumps({**BODY, "stream": stream}).encode()
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            nonlocal done
            while time.perf_counter() < stop:
                await one(s, url, body, headers)
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def throughput(direct: str, via: str, gw: Gateway, stream: bool, c: int, seconds: float) -> dict:
    hd = {"Content-Type": "application/json"}
    hg = {**hd, "Authorization": f"Bearer {KEY}"}
    d, g, cpu = [], [], []
    for _ in range(2):
        d.append(await closed_loop(direct, hd, stream, c, seconds))
        cpu0 = gw.cpu_s()
        rate = await closed_loop(via, hg, stream, c, seconds)
        cpu.append((gw.cpu_s() - cpu0) / (rate * seconds))
        g.append(rate)
    return {"direct_req_per_s": round(float(np.mean(d)), 1), "gateway_req_per_s": round(float(np.mean(g)), 1),
            "ratio": round(float(np.mean(g) / np.mean(d)), 3),
            "gateway_cpu_ms_per_request": round(float(np.mean(cpu)) * 1000, 3)}


def filter_cost() -> dict:
    """Memory and time of the word filter with the shipped lists and with 10,000 words."""
    from workbench.gateway.filter import WordFilter, read_word_list
    from workbench.gateway.sse import StreamRelay

    rng = random.Random(0)
    shipped = [w for p in ("en", "zh") for w in read_word_list(ROOT / f"data/gateway/sensitive_words.{p}.txt")]
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    big = shipped + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 14)))
                     for _ in range(5000)] + ["".join(rng.choices(cjk, k=rng.randint(2, 6))) for _ in range(5000)]
    prompt = ("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * 20)[:1000]
    tokens = [w + " " for w in prompt.split()] * 3
    events = [b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
              b'"delta":{"content":' + json.dumps(t).encode() + b'},"finish_reason":null}]}\n\n' for t in tokens]
    out = {}
    for name, words in (("shipped", shipped), ("10k_words", big)):
        rss0 = psutil.Process().memory_info().rss
        f = WordFilter(words)
        rss1 = psutil.Process().memory_info().rss
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            f.hits(prompt)
        prompt_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        reps = 20
        for _ in range(reps):
            relay = StreamRelay("chat", f, block=False, strip_usage=False, collect=False)
            for ev in events:
                relay.process(ev)
        per_event_us = (time.perf_counter() - t0) / (reps * len(events)) * 1e6
        out[name] = {"words": f.size, "rss_delta_bytes": rss1 - rss0, "prompt_1kchar_check_us": round(prompt_us, 2),
                     "stream_event_us": round(per_event_us, 2)}
    return out


def table(results: dict) -> str:
    lines = ["| profile | mode | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | "
             "direct req/s | gateway req/s | ratio | gw CPU ms/req |", "|---" * 9 + "|"]
    for prof, modes in results["profiles"].items():
        for mode, r in modes.items():
            L, T = r["latency"], r["throughput"]
            lines.append(f"| {prof} | {mode} | {L['direct']['e2e']['p50_ms']} / {L['direct']['e2e']['p99_ms']} | "
                         f"{L['gateway']['e2e']['p50_ms']} / {L['gateway']['e2e']['p99_ms']} | "
                         f"{L['added_p50_ms']} / {L['added_p99_ms']} | {T['direct_req_per_s']} | "
                         f"{T['gateway_req_per_s']} | {T['ratio']} | {T['gateway_cpu_ms_per_request']} |")
    return "\n".join(lines)


async def main_async(a) -> dict:
    config = {**vars(a), "out": os.path.relpath(a.out, ROOT)}
    results = {"schema_version": 1, "benchmark": "gateway_overhead", "config": config,
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_sha": provenance().git_sha,
               "platform": {"python": platform.python_version(), "machine": platform.machine(),
                            **cpu_info()}, "profiles": {}}
    with tempfile.TemporaryDirectory() as tmp, FakeServerProcess(
            output_tokens=16, ttft_ms=a.ttft_ms, itl_ms=a.itl_ms) as fake:
        for prof in a.profiles.split(","):
            port = free_port("127.0.0.1")
            with Gateway(gateway_config(prof, fake.base_url, Path(tmp), port), port) as gw:
                via = f"http://127.0.0.1:{port}/v1/chat/completions"
                direct = fake.base_url + "/chat/completions"
                res = {}
                for mode, stream in (("non-stream", False), ("stream", True)):
                    print(f"{prof} {mode}: latency ...", file=sys.stderr)
                    lat = await latency(direct, via, stream, a.requests)
                    print(f"{prof} {mode}: throughput ...", file=sys.stderr)
                    thr = await throughput(direct, via, gw, stream, a.concurrency, a.seconds)
                    res[mode] = {"latency": lat, "throughput": thr}
                results["profiles"][prof] = res
    results["filter"] = filter_cost()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="sequential requests per path (latency)")
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--profiles", default="full,bare")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="fake upstream TTFT (default 0: worst case)")
    p.add_argument("--itl-ms", type=float, default=0.0, help="fake upstream inter-token delay")
    p.add_argument("--out", default=str(ROOT / "results/benchmarks/gateway_overhead.json"))
    a = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    results = asyncio.run(main_async(a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    print("\nfilter:", json.dumps(results["filter"], indent=2))
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()
