"""The pushed stream's fused per-event path (workbench/gateway/pump.py) writes the bytes, and moves
the counters, that the general path (splitter -> relay -> gzip -> chunk write) does, read by read;
a revoked key or a blocked word still stops it; a full client buffer still holds the upstream."""

from __future__ import annotations

import zlib

import pytest

from gateway_helpers import WORD_LISTS
from workbench.gateway.filter import WordFilter
from workbench.gateway.http import ChunkWriter, HeadHeld
from workbench.gateway.pump import EventPump
from workbench.gateway.sse import EventSplitter, GzipStream, StreamRelay

FIRST = b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":' \
        b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'


def ev(value: str, eol: bytes = b"\n\n") -> bytes:
    return (b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":'
            b'[{"index":0,"delta":{"content":"' + value.encode() + b'"},"logprobs":null,"finish_reason":null}]}' + eol)


# reads as an upstream may deliver them: lone token events (the fused path), a word split across
# events and one whole, escapes, a value with a JSON-escaped newline, CRLF line ends, two events
# in one read, an event cut across reads, a keep-alive comment, a non-ASCII token
READS = [ev("tok "), ev("tok "), ev("bad"), ev("word"), ev(" tok "), ev('say \\"hi\\" '), ev("tok "),
         ev("a\\nb "), ev("tok ", b"\r\n\r\n"), ev("tok ") + ev("x "), ev("tok ")[:40], ev("tok ")[40:],
         b": keep-alive\n\n", ev("tok "), ev("caf\\u00e9 "), ev("tok "), ev("badword"), ev("tok ")]


class _Transport:
    def __init__(self):
        self.out = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False


class _Flow:
    write_paused = False


class _Cycle:
    def __init__(self):
        self.raw = _Transport()
        self.transport = HeadHeld(self.raw, self)
        self.transport.seen = True  # the head went out with the first event
        self.flow, self.disconnected, self.response_started = _Flow(), False, True


class _Keys:
    version = 0

    def __init__(self):
        self.valid = True


class _Resp:
    def __init__(self):
        self.held = self.woken = 0

    def hold(self) -> None:
        self.held += 1

    def wake(self) -> None:
        self.woken += 1


def _setup(words: WordFilter, gzip: bool):
    relay, frames, keys = StreamRelay("chat", words, False, True, False), EventSplitter(), _Keys()

    def step(chunk: bytes):  # relay.py's general path (revocation as a flag on the fake store)
        if not keys.valid:
            return None
        data = frames.feed(chunk)
        if not data:
            return b""
        out = relay.process(data)
        return None if relay.blocked else out

    step(FIRST)
    return relay, frames, keys, step, GzipStream() if gzip else None


def _decoded(writes: list[bytes], gzip: bool) -> bytes:
    body = b""
    for w in writes:  # each write is one HTTP chunk
        size, _, rest = w.partition(b"\r\n")
        assert int(size, 16) == len(rest) - 2 and rest.endswith(b"\r\n")
        body += rest[:-2]
    return zlib.decompressobj(31).decompress(body) if gzip else body


@pytest.mark.parametrize("gzip", [False, True])
def test_event_pump_writes_what_the_general_path_writes(gzip):
    words = WordFilter.from_files(WORD_LISTS)
    relay, frames, keys, step, gz = _setup(words, gzip)
    cycle, general = _Cycle(), []
    pump = EventPump(_Resp(), ChunkWriter(cycle), lambda c: (general.append(c), step(c))[1], relay, frames, gz, keys)
    ref_relay, _, _, ref_step, ref_gz = _setup(words, gzip)
    ref = []
    for chunk in READS:
        pump(chunk)
        out = ref_step(chunk)
        if out:
            ref.append(ref_gz.chunk(out) if ref_gz else out)
    assert cycle.raw.out == [b"%x\r\n%b\r\n" % (len(r), r) for r in ref]  # the same chunks, byte for byte
    assert relay.streamed == ref_relay.streamed and relay.hits == ref_relay.hits == 2
    assert {k: (s.buf, s.base, s.pending) for k, s in relay.streams.items()} == \
        {k: (s.buf, s.base, s.pending) for k, s in ref_relay.streams.items()}
    assert b"badword" not in _decoded(cycle.raw.out, gzip)
    assert 0 < len(general) < len(READS) - 5  # the lone plain tokens took the fused path


def test_event_pump_stops_on_a_revoked_key_and_on_a_blocked_word():
    words = WordFilter.from_files(WORD_LISTS)
    relay, frames, keys, step, _ = _setup(words, False)
    cycle, resp = _Cycle(), _Resp()
    pump = EventPump(resp, ChunkWriter(cycle), step, relay, frames, None, keys)
    pump(ev("tok "))
    pump(ev("tok "))
    keys.valid, keys.version = False, 1  # the key store reloaded without this key
    pump(ev("tok "))
    pump(ev("tok "))
    assert pump.stop and resp.held == 1 and len(cycle.raw.out) == 2
    blocking = StreamRelay("chat", words, True, True, False)
    frames2 = EventSplitter()

    def step2(chunk):
        out = blocking.process(frames2.feed(chunk))
        return None if blocking.blocked else out

    step2(FIRST)
    pump2 = EventPump(_Resp(), ChunkWriter(_Cycle()), step2, blocking, frames2, None, _Keys())
    for chunk in (ev("tok "), ev("tok "), ev("badword"), ev("tok ")):
        pump2(chunk)
    assert pump2.stop and blocking.blocked


def test_event_pump_holds_the_upstream_while_the_client_buffer_is_full_and_drops_after_it_left():
    words = WordFilter.from_files(WORD_LISTS)
    relay, frames, keys, step, _ = _setup(words, False)
    cycle, resp = _Cycle(), _Resp()
    pump = EventPump(resp, ChunkWriter(cycle), step, relay, frames, None, keys)
    pump(ev("tok "))
    cycle.flow.write_paused = True
    pump(ev("tok "))
    pump(ev("tok "))
    assert pump.full and resp.held == 1 and len(cycle.raw.out) == 3
    cycle.disconnected = True
    pump(ev("tok "))
    assert len(cycle.raw.out) == 3  # a client gone: dropped silently


@pytest.mark.parametrize("value", [b"tok ", b"bad", b"word ", b"caf\xc3\xa9", b'a"b', b"a\\nb", b"a\nb", b"x\r",
                                   b"", b"  two  spaces", b"ok."])
def test_clean_token_is_clean_ascii_of_a_plain_value(value):
    words = WordFilter.from_files(WORD_LISTS)
    plain = value.isascii() and not any(c in value for c in (b'"', b"\\", b"\r", b"\n"))
    expect = plain and words.clean_ascii(value.decode())
    assert words.clean_token(value) == expect
    assert words.clean_token(value) == expect  # the remembered verdict
