"""The client-facing HTTP layer: uvicorn's httptools protocol with the limits a public server needs.

uvicorn closes idle keep-alive connections, but it has no header or body read timeout, no cap on
connections that makes room for new ones, and no header size limit before a whole head is
buffered (httptools concatenates a header value until it ends). This subclass adds, per connection:

- **header timeout**: the request line and headers must arrive within ``http.header_timeout_s`` of
  the connection opening (or of the first byte after an idle keep-alive); else 408 and close;
- **body timeout**: the whole body within ``http.body_timeout_s`` of the end of the headers; else
  408 (a plain close once a reply has started), and the request's audit row says 408;
- **head size**: the bytes of an unfinished head are counted as they arrive; past
  ``limits.max_header_bytes`` the reply is 413 and the connection closes, so a 100 MB header costs
  one read buffer, not 100 MB;
- **connection cap**: past ``http.max_client_connections`` the connection idle the longest (no
  request in flight: a keep-alive or an unfinished head) is closed to make room, so half-open
  connections cannot lock out ``/health``; when every connection is busy the newcomer gets 503;
- **send timeout**: a client that stops reading its reply (the send buffer stays full for
  ``http.send_timeout_s``) is dropped with the reply it holds, rather than pinning it in memory;
- **disconnect hook**: when a connection is lost with its reply unfinished, the callable the app
  put on the request's scope under ``ON_GONE`` is called (the app cancels the request, and vLLM
  aborts it), so the app needs no task per request waiting on ``receive()`` for a disconnect;
- **chunk writer**: ``scope[CHUNKS]`` is a ``ChunkWriter`` that writes one chunk of a started
  chunked reply straight to the client's transport, synchronously, so the app can relay SSE
  events from the upstream's read callback without a task wake-up and an ASGI ``send`` per
  event (pump.py); flow control stays the transport's (``ChunkWriter.full``, ``drain``), and
  the reply's end still goes through ``send``;
- **one write per reply head**: a reply's head is held until its first body bytes (or the
  reply's end) and goes out with them in one ``send`` (``HeadHeld``), not two: a syscall saved
  per request (on loopback a send also runs the receiver's TCP path, ~5-8 us);
- the server's own refusals (bad framing such as Content-Length with Transfer-Encoding or a
  duplicated Content-Length, and the above) in OpenAI's error shape, with an ``x-request-id``.

    uvicorn.Config(app, http=GatewayHttpProtocol.configured(cfg), ...)   # see server.py

Plain ``uvicorn --factory workbench.gateway.app:from_env`` has none of this unless it is given
``--http workbench.gateway.http:GatewayHttpProtocol`` (the default limits; ``workbench gateway``
uses the config's).
"""

from __future__ import annotations

import logging
import resource
import time
import uuid
from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from workbench.gateway.config import GatewayConfig, HttpConfig, LimitsConfig
from workbench.gateway.sse import dumps

log = logging.getLogger(__name__)

# Set on the request's ASGI scope when this layer ends a request the app is reading, so that
# the app's audit row carries the real reason (408) rather than a client disconnect (499).
REFUSED = "gateway.refused"
# Set on every request's scope by this layer: None, then whatever the app puts there, called with
# no argument when the connection is lost before the reply is complete; GONE if that happened
# while no callable was set (the app then ends the request itself).
ON_GONE = "gateway.on_gone"
GONE = True
# Set on every request's scope by this layer: the request's ChunkWriter.
CHUNKS = "gateway.chunks"


class HeadHeld:
    """The transport a request's cycle writes to: the reply's head (uvicorn's first write after
    ``response_started``) waits for the next write, the reply's end (``flush``) or ``close``, and
    goes out with it. A ``100 Continue`` (written before the reply starts) is never held."""

    __slots__ = ("transport", "cycle", "head", "seen")

    def __init__(self, transport, cycle):
        self.transport, self.cycle, self.head, self.seen = transport, cycle, None, False

    def write(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.transport.write(head + data)
        elif not self.seen and self.cycle is not None and self.cycle.response_started:
            self.seen, self.head = True, data  # the head: held for the body's first bytes
        else:
            self.transport.write(data)

    def flush(self) -> None:
        head, self.head = self.head, None
        if head is not None and not self.transport.is_closing():
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class ChunkWriter:
    """Body chunks of a started chunked reply, written to the client's transport at once (what
    uvicorn's ``send`` does for one, without its coroutine and message dict: ~3 us an event)."""

    __slots__ = ("cycle", "transport")

    def __init__(self, cycle):
        self.cycle = cycle
        self.transport = None  # where write() writes: the client's own once the head is out

    def ready(self) -> bool:
        """The reply's head is sent, it is chunked and not complete: write() may be used."""
        c = self.cycle
        return c is not None and c.response_started and c.chunked_encoding is True and not c.response_complete \
            and c.scope["method"] != "HEAD"

    def write(self, data: bytes) -> None:
        """One chunk to the client; dropped silently once it is gone, as ``send()`` does. Past
        the held head (HeadHeld) it goes to the client's transport itself, one call fewer."""
        c = self.cycle
        if data and c is not None and not c.disconnected:
            t = self.transport
            if t is None:
                t = c.transport
                if isinstance(t, HeadHeld) and t.head is None and t.seen:
                    t = self.transport = t.transport
            t.write(b"%x\r\n%b\r\n" % (len(data), data))

    @property
    def full(self) -> bool:
        """The client's send buffer is over its high-water mark: stop producing, ``drain()``."""
        c = self.cycle
        return c is not None and c.flow.write_paused and not c.disconnected

    async def drain(self) -> None:
        if self.full:
            await self.cycle.flow.drain()


def _unlink(cycle) -> None:
    """A request's reply is over: its ChunkWriter and HeadHeld let go of the cycle, so the cycle,
    its scope and the writer are freed by reference counting, not left to the cyclic GC."""
    if cycle is None:
        return
    held = cycle.transport
    if isinstance(held, HeadHeld):
        held.flush()
        held.cycle, cycle.transport = None, held.transport
    writer = cycle.scope.get(CHUNKS)
    if writer is not None:
        writer.cycle = writer.transport = None


def error_response(status: int, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    """A complete HTTP/1.1 reply in OpenAI's error shape that closes the connection."""
    body = dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
                     str(len(body)).encode(), b"\r\nx-request-id: ", uuid.uuid4().hex.encode(),
                     b"\r\nconnection: close\r\n\r\n", body])


class GatewayHttpProtocol(HttpToolsProtocol):
    # Class attributes, set by configured(): uvicorn builds one protocol per connection itself.
    header_timeout_s = HttpConfig().header_timeout_s
    body_timeout_s = HttpConfig().body_timeout_s
    max_header_bytes = LimitsConfig().max_header_bytes
    max_connections = HttpConfig().max_client_connections
    send_timeout_s = HttpConfig().send_timeout_s

    @classmethod
    def configured(cls, cfg: GatewayConfig) -> type["GatewayHttpProtocol"]:
        return type(cls.__name__, (cls,), {
            "header_timeout_s": cfg.http.header_timeout_s, "body_timeout_s": cfg.http.body_timeout_s,
            "max_header_bytes": cfg.limits.max_header_bytes,
            # never above what the open-file limit allows: past it accept() fails and the kernel
            # drops connections silently, where the cap would make room or answer 503
            "max_connections": max(1, min(cfg.http.max_client_connections, fd_room())),
            "send_timeout_s": cfg.http.send_timeout_s})

    # ---- connection --------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self._deadline: TimerHandle | None = None
        self._send_timer: TimerHandle | None = None
        self._in_head = self._in_body = False
        self._head_bytes = 0
        self._idle_since = time.monotonic()
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._make_room():
            log.warning("%d client connections, all busy: refusing a new one", len(self.connections))
            self._refuse(503, "The gateway has too many connections; retry shortly.",
                         "too_many_connections", "server_error")
            return
        self._arm(self.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        cycle = self.cycle
        super().connection_lost(exc)
        _unlink(cycle)
        if cycle is not None and cycle.disconnected and ON_GONE in cycle.scope:
            gone = cycle.scope[ON_GONE]
            cycle.scope[ON_GONE] = GONE
            if gone is not None and gone is not GONE:
                gone()

    # ---- a client that does not read its reply ----------------------------------------------
    def pause_writing(self) -> None:
        """The send buffer is full (the client is not reading): it has send_timeout_s to drain."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timeout(self) -> None:
        self._send_timer = None
        if self.cycle is not None and REFUSED not in self.cycle.scope:
            self.cycle.scope[REFUSED] = (408, f"the client read none of the reply for {self.send_timeout_s:g} s")
        log.warning("client %s read nothing for %g s: connection dropped", self.client, self.send_timeout_s)
        self.transport.abort()  # close() would wait to flush what it is not reading

    def _idle(self) -> bool:
        """No request in flight: nothing is lost by closing this connection."""
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def _make_room(self) -> bool:
        """Close the connection idle the longest (not this one); False if every one is busy."""
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GatewayHttpProtocol) and c._idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)
        self.connections.discard(victim)  # counted out now; its connection_lost comes later
        victim.transport.close()
        return True

    # ---- timers -----------------------------------------------------------------------------
    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self._refuse(408, f"The request headers did not arrive within {self.header_timeout_s:g} s.",
                         "header_timeout")

    def _body_timeout(self) -> None:
        self._deadline = None
        if self.pipeline:  # reading is paused behind an earlier request: not the client's fault
            self._arm(self.body_timeout_s, self._body_timeout)
        elif not self.transport.is_closing():
            self._refuse(408, f"The request body did not arrive within {self.body_timeout_s:g} s.",
                         "body_timeout")

    def _refuse(self, status: int, message: str, code: str, type_: str = "invalid_request_error") -> None:
        """Answer in OpenAI's shape where that is safe, and close the connection."""
        cycle = self.cycle
        if self._in_body and cycle is not None:  # the request whose body is arriving: its app task sees a disconnect
            cycle.scope[REFUSED] = (status, message)
            if not cycle.response_started:
                self.transport.write(error_response(status, message, code, type_))
            cycle.keep_alive, cycle.response_started, cycle.disconnected = False, True, True
            cycle.message_event.set()
        elif cycle is None or cycle.response_complete:  # nothing in flight: a head, or no request yet
            self.transport.write(error_response(status, message, code, type_))
        # else a pipelined head behind a request still in flight: a reply now would answer that one
        self._disarm()
        self.transport.close()

    # ---- parser callbacks ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.cycle is not None and self.cycle.response_complete:
            # the first byte after an idle keep-alive starts the header clock (a trickle of
            # blank lines, which starts no request, cannot hold the connection open either)
            self._arm(self.header_timeout_s, self._header_timeout)
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(413, f"Request headers exceed the limit of {self.max_header_bytes} bytes.",
                             "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._deadline is None:
            self._arm(self.header_timeout_s, self._header_timeout)

    def on_headers_complete(self) -> None:
        # uvicorn parses the URL here: a bad one (``GET http://``) raises before a cycle exists
        super().on_headers_complete()
        self.scope[ON_GONE] = None  # (the app's task starts on a later loop turn, after this)
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            cycle.transport = HeadHeld(self.transport, cycle)
        self.scope[CHUNKS] = ChunkWriter(cycle)
        self._in_head, self._in_body = False, True
        self._arm(self.body_timeout_s, self._body_timeout)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()  # the request is in; the app's own (upstream) timeouts take over
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        _unlink(self.cycle)  # (a held head without body bytes, HEAD or an empty 204, goes out here)
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # httptools refused the framing (e.g. Content-Length with Transfer-Encoding)
        self._refuse(400, "Invalid HTTP request: malformed request line, headers or framing.",
                     "invalid_http_request")


def fd_room() -> int:
    """Client connections the open-file limit leaves room for (64 kept for the upstream pool,
    the audit database, the listening socket and the filter worker)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft - 64


def raise_fd_limit(connections: int) -> None:
    """Raise the soft limit on open files so that ``connections`` clients (plus the upstream pool,
    the audit database and the listening socket) fit; warn when the hard limit forbids it."""
    need = connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < need:
            log.warning("open-file limit %d is below http.max_client_connections + 64 = %d: the "
                        "connection cap is lowered to %d (raise `ulimit -n`)", new, need, max(1, new - 64))
