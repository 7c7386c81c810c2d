"""The floor of a Python gateway: a bare TCP byte relay on uvloop, no HTTP parsing, no policy.

    python benchmarks/bare_relay.py --port 8100 --upstream 127.0.0.1:8099            # bytes only
    python benchmarks/bare_relay.py --port 8100 --upstream 127.0.0.1:8099 --parse    # + httptools

Each client connection gets its own upstream connection (opened when the client connects); the
bytes each side reads are written to the other as they arrive (``data_received`` -> the peer's
``transport.write``), with the flow control any proxy needs (a peer whose send buffer is full
pauses reading on this side). Per relayed SSE event that is one wake-up of the loop, one
``recv`` and one ``send`` syscall: what every Python/uvloop gateway with two sockets pays, so
``benchmarks/gateway_cpu.py --floor`` measures it beside the gateway, in the same run.

``--parse`` also feeds every byte to httptools (a request parser on the client side, a response
parser on the upstream side, header callbacks kept), as an HTTP-aware proxy must: the floor of a
Python gateway that understands HTTP but decides nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import httptools
import uvloop

log = logging.getLogger(__name__)


class _Parsed:
    """httptools callbacks that keep what a proxy would read: the headers and body sizes."""

    def __init__(self):
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_bytes = 0

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)


class Side(asyncio.Protocol):
    """One socket of a pair; ``peer`` is the other. Bytes read here are written there."""

    def __init__(self, parser=None):
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []  # client bytes that came before the upstream connected
        self.feed = parser.feed_data if parser is not None else None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.feed is not None:
            self.feed(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.close()

    # a peer that cannot take more stops this side reading (and starts it again)
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Side):
    def __init__(self, upstream: tuple[str, int], parse: bool):
        self.parse = parse
        super().__init__(httptools.HttpRequestParser(_Parsed()) if parse else None)
        self.upstream = upstream

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        parser = httptools.HttpResponseParser(_Parsed()) if self.parse else None
        try:
            _, up = await loop.create_connection(lambda: Side(parser), *self.upstream)
        except OSError as err:
            log.warning("cannot reach the upstream: %s", err)
            self.transport.close()
            return
        up.peer, self.peer = self, up
        if self.closed:
            up.transport.close()
            return
        if self.pending:
            up.transport.write(b"".join(self.pending))
            self.pending = []


async def serve(port: int, upstream: tuple[str, int], parse: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientSide(upstream, parse), "127.0.0.1", port, backlog=1024)
    log.info("bare relay on 127.0.0.1:%d -> %s:%d (httptools: %s)", port, *upstream, parse)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    p.add_argument("--parse", action="store_true", help="also parse both directions with httptools")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    host, _, port = a.upstream.rpartition(":")
    uvloop.run(serve(a.port, (host, int(port)), a.parse))


if __name__ == "__main__":
    main()
