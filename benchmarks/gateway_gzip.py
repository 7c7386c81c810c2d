"""The gateway's gzip SSE, one event's flushed piece (``sse.GzipStream.chunk``, as shipped): CPU and
bytes with zlib-ng's deflate against the standard library's zlib, side by side in one run.

    .venv/bin/python benchmarks/gateway_gzip.py            # ~30 s
    .venv/bin/python benchmarks/gateway_gzip.py --repeats 20 --out results/benchmarks/gateway_gzip.json

The events are vLLM-shaped chat chunks, one token each, the tokens taken in order from the
project's README (real text: tokens repeat as they do in generated text, the skeleton is always
the same), a stream of ``--events`` events per reply. One repeat compresses ``--streams`` replies
with each backend in turn (the order alternates by repeat); the unit is the repeat: mean over
repeats with a 95 % t interval (``workbench.stats.mean``), the ratio zlib-ng / zlib paired by repeat. Every piece is
inflated by the standard library to the original event before it counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zlib_ng import zlib_ng  # noqa: E402

from workbench.gateway.sse import GzipStream  # noqa: E402
from workbench.stats import mean  # noqa: E402

BACKENDS = {"zlib": zlib, "zlib-ng": zlib_ng}


def events(n: int) -> list[bytes]:
    """n one-token chat chunks in vLLM's shape, the tokens from README.md's words and spaces."""
    tokens = re.findall(r"\s?\S+", (ROOT / "README.md").read_text())
    skeleton = ('{"id":"chatcmpl-8c1f2e","object":"chat.completion.chunk","created":1733500000,'
                '"model":"fake-model","choices":[{"index":0,"delta":{"content":%s},'
                '"logprobs":null,"finish_reason":null}]}')
    return [b"data: " + (skeleton % json.dumps(tokens[i % len(tokens)])).encode() + b"\n\n" for i in range(n)]


def one(module, evs: list[bytes], streams: int) -> tuple[float, float]:
    """CPU seconds per event and compressed bytes per event over ``streams`` replies."""
    pieces = 0
    t0 = time.process_time()
    for _ in range(streams):
        chunk = GzipStream(module).chunk
        for e in evs:
            pieces += len(chunk(e))
    cpu = time.process_time() - t0
    return cpu / (streams * len(evs)), pieces / (streams * len(evs))


def check(module, evs: list[bytes]) -> None:
    gz, d = GzipStream(module), zlib.decompressobj(31)
    for e in evs:
        assert d.decompress(gz.chunk(e)) == e


def fmt(e) -> str:
    return f"{e.value:.2f} [{e.lo:.2f}, {e.hi:.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=256, help="events of one reply")
    p.add_argument("--streams", type=int, default=200, help="replies per backend per repeat")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    evs = events(a.events)
    for m in BACKENDS.values():
        check(m, evs)
    cpu = {k: [] for k in BACKENDS}
    size = {k: [] for k in BACKENDS}
    for r in range(a.repeats):
        for name in (list(BACKENDS) if r % 2 == 0 else list(BACKENDS)[::-1]):
            c, b = one(BACKENDS[name], evs, a.streams)
            cpu[name].append(c * 1e6)
            size[name].append(b)
    out = {"benchmark": "gateway_gzip", "config": {k: v for k, v in vars(a).items() if k != "out"},
           "platform": {"python": platform.python_version(), "machine": platform.machine(),
                        "zlib": zlib.ZLIB_RUNTIME_VERSION, "zlib_ng": zlib_ng.ZLIBNG_VERSION},
           "event_bytes_mean": float(np.mean([len(e) for e in evs])), "backends": {}}
    for name in BACKENDS:
        e = mean(cpu[name])
        out["backends"][name] = {"cpu_us_per_event": e.model_dump(), "bytes_per_event": float(np.mean(size[name])),
                                 "repeats_us": cpu[name]}
        print(f"{name}: {fmt(e)} us an event, {np.mean(size[name]):.1f} B an event "
              f"(events of {out['event_bytes_mean']:.0f} B)")
    ratio = mean([n / z for n, z in zip(cpu["zlib-ng"], cpu["zlib"])])
    out["ratio_zlib_ng_to_zlib"] = ratio.model_dump()
    print(f"zlib-ng / zlib, paired by repeat: {fmt(ratio)}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
