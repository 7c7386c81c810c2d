"""The Python parts of one relayed SSE event, each timed alone (timeit, warm caches): what the
gateway's per-event CPU above the bare relay's floor (benchmarks/gateway_cpu.py --floor) is made
of, without a profiler's overhead. The event is the fake upstream's token chunk; the filter has
the shipped word lists.

    flock /tmp/wb-heavy.lock .venv/bin/python benchmarks/gateway_event_parts.py   # ~10 s

In a running gateway the same code runs with colder caches (16 streams interleaved), so these
are lower bounds of its share there.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import timeit
import zlib
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workbench.gateway import client as native  # noqa: E402
from workbench.gateway.filter import WordFilter  # noqa: E402
from workbench.gateway.http import ChunkWriter, HeadHeld  # noqa: E402
from workbench.gateway.pump import EventPump  # noqa: E402
from workbench.gateway.sse import EventSplitter, GzipStream, StreamRelay  # noqa: E402
from workbench.testing.fakeapp import _stream_parts  # noqa: E402

log = logging.getLogger("gateway_event_parts")
N = 200_000


def us(fn) -> float:
    """Mean microseconds per call over N calls (best of 3 runs)."""
    return min(timeit.repeat(fn, number=N, repeat=3)) / N * 1e6


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading


class _Cycle:  # a started chunked reply whose head went out with its first event
    def __init__(self):
        self.transport = HeadHeld(_Transport(), self)
        self.transport.seen = True
        self.flow = type("Flow", (), {"write_paused": False})()
        self.disconnected, self.response_started = False, True


def read_callback(f: WordFilter, first: bytes, tok: bytes, fused: bool):
    """One upstream read of one token event, from the client's ``data_received`` (httptools
    decoding the chunk) to the client transport's ``write``, as a pushed stream (pump.py) runs it:
    the fused path, or (``fused=False``) the general one (splitter -> relay -> gzip -> write)."""
    loop = asyncio.new_event_loop()  # (its clock only: nothing runs on it)
    conn = native.Connection(SimpleNamespace(loop=loop), ("upstream", 80, False))
    conn.connection_made(_Transport())
    resp = conn.resp = native.Response(conn)
    conn.parser.feed_data(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                          b"transfer-encoding: chunked\r\n\r\n")
    relay, frames, keys = StreamRelay("chat", f, False, True, False), EventSplitter(), type("Keys", (), {"version": 0})()

    def step(chunk: bytes):  # relay.py's general path
        data = frames.feed(chunk)
        out = relay.process(data) if data else b""
        return None if relay.blocked else out

    step(first)
    step(tok)
    pump = EventPump(resp, ChunkWriter(_Cycle()), step, relay, frames, GzipStream(), keys)
    pump.fast = fused
    resp.push(pump)
    wire = b"%x\r\n%b\r\n" % (len(tok), tok)
    return lambda: conn.data_received(wire)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    f = WordFilter.from_files([str(ROOT / "data/gateway/sensitive_words.en.txt"),
                               str(ROOT / "data/gateway/sensitive_words.zh.txt")])
    first, tok, _ = _stream_parts("chat", "fake-model", 64)
    relay = StreamRelay("chat", f, False, True, False)
    relay.process(first)
    relay.process(tok)  # the skeleton of a token event is cached from here on
    splitter = EventSplitter()
    splitter.feed(first)
    parts = {
        "EventSplitter.feed (cut at the last blank line)": lambda: splitter.feed(tok),
        "StreamRelay.process (filter check, skeleton cached)": lambda: relay.process(tok),
        "  of which WordFilter.clean_ascii": lambda: f.clean_ascii("tok "),
    }
    parts["GzipStream.chunk (as shipped: level 1, 4 KiB window)"] = lambda g=GzipStream(): g.chunk(tok)
    z1 = zlib.compressobj(1, zlib.DEFLATED, 31)  # the alternative weighed (round 4): not worth it
    parts["gzip level 1: compress + sync flush"] = lambda: z1.compress(tok) + z1.flush(zlib.Z_SYNC_FLUSH)
    parts["chunk framing (b'%x\\r\\n%b\\r\\n')"] = lambda: b"%x\r\n%b\r\n" % (len(tok), tok)
    parts["one read, read callback to write: general path"] = read_callback(f, first, tok, False)
    parts["one read, read callback to write: fused (EventPump)"] = read_callback(f, first, tok, True)
    log.info("one event: %d bytes", len(tok))
    for name, fn in parts.items():
        log.info("%-55s %5.2f us", name, us(fn))


if __name__ == "__main__":
    main()
