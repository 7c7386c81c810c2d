"""The per-event path of a started SSE stream, run from the upstream's read callback.

Once a stream's first event has gone out through ASGI ``send`` (relay.py), the rest is pushed:
the native client (client.py) hands each piece of the upstream's body to ``EventPump`` from its
read callback, which cuts events (``EventSplitter``), checks them (``StreamRelay``), gzips them
and writes each as one chunk straight to the client's transport (http.ChunkWriter), with no task
wake-up per event. The client's full send buffer holds reading from the upstream until it drains.

``EventPump`` fuses those layers for the common event, a lone token event in one read: one
method call does what five did (the splitter's cut, the relay's skeleton check, the filter's
verdict, gzip, the chunk write), with the same bytes out and the same state kept:

- the relay's cached skeleton (``StreamRelay._passes``) is matched on the read itself, and only
  where that makes it one whole event that ``feed`` passes whole and keeps nothing of (no CR or
  LF in the skeleton or the value, the blank line at the end, nothing buffered); the value
  passes only if its stream filter holds nothing and ``WordFilter.clean_token`` (a cached
  ``clean_ascii`` that also wants no quote, backslash, CR or LF) says so, and then the relay's and filter's counters move exactly as
  ``StreamFilter.passes`` moves them; anything else goes through ``StreamRelay.process`` as before;
- a key revocation is checked on every read (``step`` handles it when the key store changed);
- the chunk goes out through ``ChunkWriter.write`` (to the transport under the held head,
  dropped once the client is gone).

One read of one token event, read callback to write: 5.7 -> 3.3 us warm
(benchmarks/gateway_event_parts.py); per relayed event in benchmarks/gateway_cpu.py, -2.3 us
(results/benchmarks/gateway_cpu_round6.md).
"""

from __future__ import annotations


class EventPump:
    """``resp.sink`` of a pushed stream (see the module's docstring). ``step(bytes)`` is the
    relay's general path: the bytes to send (b"": nothing yet), or None to stop."""

    __slots__ = ("resp", "writer", "step", "relay", "frames", "keys", "keys_seen", "compress",
                 "fast", "sk", "pre", "post", "sf", "clean", "stop", "full")

    def __init__(self, resp, writer, step, relay, frames, gz, keys):
        self.resp, self.writer, self.step, self.relay, self.frames = resp, writer, step, relay, frames
        self.keys, self.keys_seen = keys, keys.version
        self.compress = gz.chunk if gz else None  # sse.GzipStream: one flushed gzip piece an event
        # the relay's skeleton path applies: filtering on, no text collected for moderation
        self.fast = relay.filter is not None and relay.parse_all and not relay.collect
        self.clean = relay.filter.clean_token if self.fast else None
        self.sk = self.pre = self.post = self.sf = None
        self.stop = self.full = False

    def __call__(self, chunk: bytes) -> None:
        if self.stop:
            return
        relay = self.relay
        if self.fast and self.keys.version == self.keys_seen:
            sk = relay._skeleton
            if sk is not self.sk:  # the relay cached another skeleton: take it if it has no line end
                self.sk = sk
                self.pre = None
                if sk is not None and not any(c in part for part in sk[:2] for c in (b"\r", b"\n")):
                    self.pre, post, self.sf = sk
                    self.post = post + b"\n\n"
            pre = self.pre
            frames = self.frames
            if pre is not None and not frames.buf and not frames.cr and not frames.first \
                    and relay._template is not None and not relay.guards:
                post, sf = self.post, self.sf
                end = len(chunk) - len(post)
                if end >= len(pre) and chunk.startswith(pre) and chunk.endswith(post):
                    # pre + value + post + LF LF, with no CR or LF in pre, post or value: what
                    # feed() passes whole and keeps nothing of, and process() reads as one event
                    value = chunk[len(pre):end]
                    if not sf.buf and not sf.pending and self.clean(value):
                        sf.base += len(value)  # as StreamFilter.passes
                        relay.streamed += bool(value)  # as StreamRelay._passes
                        self._send(chunk)
                        return
        out = self.step(chunk)
        if out is None:
            self._halt()
            return
        self.keys_seen = self.keys.version  # (step saw any change: a key still valid goes on)
        if out:
            self._send(out)

    def _halt(self) -> None:
        """step stopped the stream (a revoked key, a blocked word): the task ends it."""
        self.stop = True
        self.resp.hold()
        self.resp.wake()

    def _send(self, out: bytes) -> None:
        writer = self.writer
        writer.write(self.compress(out) if self.compress is not None else out)
        if writer.full and not self.full:  # the client's send buffer is full: hold
            self.full = True
            self.resp.hold()
            self.resp.wake()


async def push_stream(resp, writer, step, relay, frames, gz, keys) -> bool:
    """The rest of a started stream relayed from the upstream's read callback (``EventPump``).
    True if ``step`` stopped it (a revoked key, a blocked word)."""
    pump = EventPump(resp, writer, step, relay, frames, gz, keys)
    resp.push(pump)
    try:
        while not pump.stop and not resp.complete:
            if pump.full:
                await writer.drain()
                pump.full = False
                resp.resume()
            else:
                await resp.wait()
    finally:
        resp.sink = None  # (resp -> pump -> resp: freed by reference counting, not the GC)
    return pump.stop
