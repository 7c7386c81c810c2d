"""Server-sent events: the one parser the gateway, the load generator and the tests share.

The framing is the WHATWG HTML "server-sent events" event-stream format
(https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream):

- a line ends in CRLF, LF or CR. vLLM and the fake server use LF; sse-starlette (and so any
  server built on it) uses CRLF by default; CR alone is legal and rare;
- an event ends at a blank line; a last event without one is discarded by a browser, but an
  OpenAI stream that breaks there is still worth reading, so ``EventSplitter.rest`` hands it over;
- a line starting with ``:`` is a comment (keep-alives); ``field:value`` drops ONE space after
  the colon; several ``data`` lines make one value joined by LF; ``event``, ``id`` and ``retry``
  are fields the OpenAI streams never need, and are skipped;
- one UTF-8 byte-order mark at the start of the stream is dropped.

``[DONE]`` is OpenAI's end-of-stream sentinel (a ``data`` value, not an SSE rule).

Standard library only: the gateway and the load generator must start in milliseconds and import
nothing of the pipeline. Bytes in, bytes out, so the hot paths never decode twice.
"""

from __future__ import annotations

from collections.abc import Iterator

DONE = b"[DONE]"  # OpenAI's last data value


class EventSplitter:
    """Cuts a byte stream into complete SSE events with their line ends turned into LF: ``feed``
    returns every event completed so far, each ending in a blank line (``b"...\\n\\n"``), or b"".
    A CR ending a chunk ends its line at once; an LF starting the next chunk is then the rest of
    that CRLF, and dropped."""

    __slots__ = ("buf", "cr", "first")

    def __init__(self):
        self.buf, self.cr, self.first = b"", False, True

    def feed(self, chunk: bytes) -> bytes:
        if self.first and chunk:  # one UTF-8 BOM at the start of a stream is dropped
            self.first = False
            if chunk[:3] == b"\xef\xbb\xbf":
                chunk = chunk[3:]
        if self.cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self.cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self.buf + chunk if self.buf else chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return b""
        self.buf = buf[cut + 2:]
        return buf[:cut + 2]

    def rest(self) -> bytes:
        """What is left when the stream ends: a last event without its blank line, or b""."""
        rest, self.buf = self.buf, b""
        return rest + b"\n\n" if rest.strip() else b""


def event_data(event: bytes) -> bytes | None:
    """The ``data`` value of one LF-framed event (as ``EventSplitter`` cuts them, without or with
    its blank line), or None when it has no data field (a comment, a keep-alive, ``event:`` only)."""
    if event[:5] == b"data:" and b"\n" not in event.rstrip(b"\n"):  # the usual one-line event
        value = event[5:].rstrip(b"\n")
        return value[1:] if value[:1] == b" " else value
    values = []
    for line in event.split(b"\n"):
        if not line or line[:1] == b":":
            continue
        name, colon, value = line.partition(b":")
        if name == b"data":
            values.append(value[1:] if colon and value[:1] == b" " else value)
    return b"\n".join(values) if values else None


def split_data(data: bytes) -> Iterator[bytes]:
    """The data values of a run of complete events (``EventSplitter.feed``'s output), in order."""
    for event in data.split(b"\n\n"):
        if event:
            value = event_data(event)
            if value is not None:
                yield value


def iter_data(body: bytes | str) -> Iterator[bytes]:
    """The data values of a whole SSE body, any line ends, the last event kept even without its
    blank line. ``[DONE]`` is yielded as it came (callers decide what it means)."""
    sp = EventSplitter()
    raw = body.encode() if isinstance(body, str) else body
    yield from split_data(sp.feed(raw) + sp.rest())
