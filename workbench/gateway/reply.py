"""One upstream reply of the native client (client.py), and the client's failures.

A ``Response`` is what ``Client.request`` returns once the reply's head has arrived: its body
comes through ``readany()`` / ``read()`` (aiohttp's shape, so upstream.py and relay.py treat both
clients alike), or, in push mode, from the connection's read callback straight into a sink
(pump.py: a stream's path after its first event). The ``Connection`` that reads it (client.py)
fills it in; this module holds no socket code.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.gateway.client import Connection


class ClientError(Exception):
    """An upstream reply that could not be had or read."""


class ConnectFailed(ClientError):
    pass


class Disconnected(ClientError):
    pass


class BadReply(ClientError):
    pass


class Response:
    """One upstream reply: ``status``, ``headers`` (lower-case names), and the body through
    ``readany()`` (whatever has arrived, b"" at its end) or ``read()``. ``release()`` when done
    (a fully read reply's connection goes back to the pool), ``close()`` to drop the connection
    (the upstream sees the client leave: vLLM aborts the request)."""

    __slots__ = ("status", "headers", "complete", "content", "_conn", "_chunks", "_size", "_exc",
                 "_waiter", "_framed", "_replica", "_pool", "sink")

    def __init__(self, conn: "Connection"):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.complete = False
        self.content = self  # aiohttp's shape: resp.content.readany()
        self._conn: Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._framed = False  # Content-Length or chunked: else the body ends when the connection does
        self._replica = self._pool = None  # set by upstream.py
        self.sink = None  # push mode: called with each piece of body as it is read

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/octet-stream").partition(";")[0].strip().lower()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None and not self.complete:
            self._exc = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    async def _wait(self) -> None:
        conn = self._conn
        if conn is None:
            raise Disconnected("the reply was released")
        self._waiter = conn.loop.create_future()
        conn.arm()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _head(self) -> None:
        while not self.status:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def readany(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks, self._size = [], 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                return data
            if self.complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()

    def push(self, sink) -> None:
        """From now on hand each piece of the body to ``sink(bytes)`` as it is read (what has
        been read and not taken yet first). ``wait()`` then waits for the end."""
        chunks, self._chunks, self._size = self._chunks, [], 0
        self.sink = sink
        if chunks:
            sink(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()

    async def wait(self) -> None:
        """Push mode: return when the reply is complete or the sink called ``wake()``; raise the
        reply's failure (a timeout, a broken connection)."""
        if self._exc is not None:
            raise self._exc
        if not self.complete:
            await self._wait()
            if self._exc is not None:
                raise self._exc

    def wake(self) -> None:
        self._wake()

    def hold(self) -> None:
        """Stop reading from the upstream (the sink's consumer is full); ``resume()`` restarts."""
        conn = self._conn
        if conn is not None and not conn.paused and not conn.closed:
            conn.paused = True
            conn.transport.pause_reading()

    def resume(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.client._release(conn, reuse=self.complete and conn.keep_alive)
        self._done()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.client._release(conn, reuse=False)
        self._done()

    def _done(self) -> None:
        """Tell the replica's pool (upstream.py sets it) that the reply is over, once."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.done(self._replica)
