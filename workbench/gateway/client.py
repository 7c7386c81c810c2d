"""The gateway's upstream HTTP/1.1 client: asyncio protocols with httptools parsing the replies.

Why not aiohttp's client (which the health checks, ``/v1/models`` and the ``llm`` moderation
policy still use): on the request path it was the largest single part of the gateway's CPU
(25 % of a non-streamed request, results/benchmarks/gateway_cpu_round2.md), spent on what a
proxy in front of one kind of server does not need: a request builder that merges cookies,
URL objects and headers per call, a timer context per read, a StreamReader with its own
coroutine layers. This client writes a request as one pre-built head plus the body in one
``write``, and hands the reply's body on as the socket delivers it (chunked encoding decoded by
httptools), with:

- a keep-alive pool per (host, port, TLS or not): idle connections reused most recent first, dropped when
  the upstream closes them or after ``KEEPALIVE_S`` idle; at most ``limit`` requests in flight
  over all upstreams (the rest wait, as aiohttp's connector ``limit`` did);
- ``connect_timeout_s`` on opening a connection and ``read_timeout_s`` of upstream silence while
  a reply is awaited (head or body), both raised as ``asyncio.TimeoutError``;
- failures as three exceptions that upstream.py maps the way it mapped aiohttp's:
  ``ConnectFailed`` (refused, unreachable: the replica is ejected, 503 after a retry),
  ``Disconnected`` (the connection closed before the reply was complete: a stale keep-alive
  before the head, retried once; mid-stream, a broken stream) and ``BadReply`` (not HTTP);
- push mode (``Response.push(sink)``): the body goes to ``sink(bytes)`` from the read callback
  itself, so a relayed SSE event costs no future, task wake-up or coroutine (pump.py);
  ``hold()`` / ``resume()`` pause and restart reading for the sink's own back-pressure, and
  ``wait()`` returns when the sink or the reply's end wakes it, raising the reply's failure;
- back-pressure: past ``HIGH_WATER`` bytes of unread body, reading from the upstream pauses, so a
  slow client holds at most that much of a reply here (the socket buffers hold the rest, and
  the upstream's writes wait).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import httptools

from workbench.gateway.reply import (  # noqa: F401  (re-exported: relay.py, upstream.py)
    BadReply, ClientError, ConnectFailed, Disconnected, Response)

KEEPALIVE_S = 30.0  # an idle upstream connection is closed after this long (aiohttp's keepalive_timeout)
HIGH_WATER = 256 * 1024  # bytes of unread reply body before reading from the upstream pauses


class Connection(asyncio.Protocol):
    """One upstream connection; ``resp`` is the reply it is reading (None while idle)."""

    def __init__(self, client: "Client", key: tuple[str, int, bool]):
        self.client, self.key, self.loop = client, key, client.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = self.paused = self.keep_alive = False
        self.idle_since = 0.0
        self.last_data = 0.0  # loop time of the last bytes from the upstream (or of the request)
        self._timer: asyncio.TimerHandle | None = None

    # ---- read timeout: one timer per reply that re-arms itself while data keeps coming -------
    def arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_at(self.last_data + self.client.read_timeout_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        resp = self.resp
        if resp is None or resp.complete or self.closed:
            return
        waiting = resp._waiter is not None and not resp._waiter.done()
        # (a timer may fire up to a millisecond early: the loop's clock resolution)
        if waiting and not self.paused and self.loop.time() - self.last_data >= self.client.read_timeout_s - 1e-3:
            resp._fail(asyncio.TimeoutError())
            self.abort()
        elif waiting:
            self.arm()  # data came since it was armed: wait the rest from the last bytes

    # ---- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        if self.resp is None:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self.resp._fail(BadReply(f"unreadable reply: {err}"))
            self.abort()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.client._forget(self)
        self._cancel_timer()
        resp = self.resp
        if resp is not None and not resp.complete:
            if resp.status and not resp._framed:
                resp.complete = True  # a body delimited by the end of the connection
                resp._wake()
            else:
                resp._fail(Disconnected("the upstream closed the connection"
                                        + (" mid-reply" if resp.status else "")))

    # ---- httptools callbacks -----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.decode("latin-1").lower()
        self.resp.headers[n] = value.decode("latin-1")
        if n == "content-length" or n == "transfer-encoding":
            self.resp._framed = True

    def on_headers_complete(self) -> None:
        resp = self.resp
        resp.status = self.parser.get_status_code()
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp.sink is not None:
            try:
                resp.sink(body)
            except Exception as err:  # a bug in the sink: the waiting task raises it
                resp._fail(err)
            return
        resp._chunks.append(body)
        resp._size += len(body)
        if resp._size > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        resp._wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        self.keep_alive = self.parser.should_keep_alive()
        resp.complete = True
        self._cancel_timer()
        resp._wake()

    # ---- helpers -------------------------------------------------------------------------------
    def resume(self) -> None:
        self.paused = False
        self.last_data = self.loop.time()
        if not self.closed:
            self.transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        self._cancel_timer()
        if not self.closed and self.transport is not None:
            self.transport.abort()
        self.closed = True


class Client:
    """Keep-alive connections to upstream servers, created on the loop that will use them."""

    def __init__(self, limit: int, connect_timeout_s: float, read_timeout_s: float):
        self.loop = asyncio.get_running_loop()
        self.limit, self.connect_timeout_s, self.read_timeout_s = limit, connect_timeout_s, read_timeout_s
        self.idle: dict[tuple[str, int, bool], deque[Connection]] = {}
        self.busy = 0  # requests holding a connection (or opening one)
        self._slots: deque[asyncio.Future] = deque()  # requests waiting for busy < limit
        self.opened = 0  # connections ever opened (tests read it: keep-alive reuse)
        self._ssl: ssl.SSLContext | None = None  # for https upstreams, made on first use

    async def request(self, host: str, port: int, tls: bool, head: bytes, body: bytes) -> Response:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``; return
        once the reply's head has arrived. On any failure the connection is dropped."""
        if self.busy >= self.limit:
            fut = self.loop.create_future()
            self._slots.append(fut)
            try:
                await fut  # the releasing request handed its slot over (busy not decremented)
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._free()  # got the slot while being cancelled: pass it on
                elif fut in self._slots:
                    self._slots.remove(fut)
                raise
        else:
            self.busy += 1
        try:
            conn = self._idle_conn((host, port, tls)) or await self._connect(host, port, tls)
        except BaseException:
            self._free()
            raise
        resp = conn.resp = Response(conn)
        conn.keep_alive = False
        conn.last_data = self.loop.time()
        conn.transport.write(head + body)
        try:
            await resp._head()
        except BaseException:
            resp.close()
            raise
        return resp

    def _idle_conn(self, key: tuple[str, int, bool]) -> Connection | None:
        idle = self.idle.get(key)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()  # the most recent: least likely to be closed by the upstream
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.abort()
        return None

    async def _connect(self, host: str, port: int, tls: bool) -> Connection:
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self, (host, port, tls)), host, port,
                                            ssl=self._ssl if tls else None),
                self.connect_timeout_s)
        except OSError as err:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {err}") from None
        self.opened += 1
        return conn

    def _release(self, conn: Connection, reuse: bool) -> None:
        conn.resp = None
        conn._cancel_timer()
        if reuse and not conn.closed and not conn.paused:
            conn.idle_since = now = self.loop.time()
            idle = self.idle.setdefault(conn.key, deque())
            while idle and now - idle[0].idle_since >= KEEPALIVE_S:
                idle.popleft().abort()
            idle.append(conn)
        else:
            conn.abort()
        self._free()

    def _free(self) -> None:
        """A request let go of its slot: hand it to the next waiting one, if any."""
        while self._slots:
            fut = self._slots.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.busy -= 1

    def _forget(self, conn: Connection) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn.resp is None:
            try:
                idle.remove(conn)
            except ValueError:
                pass

    def close(self) -> None:
        for idle in self.idle.values():
            while idle:
                idle.pop().abort()
