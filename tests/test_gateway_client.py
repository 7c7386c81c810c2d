"""The gateway's native upstream client (workbench/gateway/client.py) against raw asyncio servers
that write exactly the bytes a test needs: keep-alive reuse, chunked decoding, an upstream that
dies mid-reply, a silent upstream, refusal, the request cap; and the gateway on either client."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from aiohttp import web

from gateway_helpers import AUTH, RawUpstream, chunk_event, make_cfg, sse_events
from workbench.gateway import client as native
from workbench.gateway.server import GatewayServer
from workbench.net import free_port

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def request_bytes(body: bytes = b"{}") -> tuple[bytes, bytes]:
    return HEAD + b"Content-Length: %d\r\n\r\n" % len(body), body


async def serve(handler) -> tuple[asyncio.AbstractServer, int, list]:
    """A raw server on a free port; ``handler(reader, writer, n)`` answers the n-th request of a
    connection; returns the server, its port, and the list of connections it accepted."""
    conns = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        conns.append(writer)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(l.split(b":")[1] for l in head.split(b"\r\n")
                                  if l.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                if await handler(reader, writer, n) is False:
                    break
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test ended with a handler still waiting
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


def reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def fetch(client: native.Client, port: int) -> bytes:
    """One request to 127.0.0.1:port, its whole body read and its connection released."""
    resp = await client.request("127.0.0.1", port, False, *request_bytes())
    body = await resp.read()
    resp.release()
    return body


def test_keep_alive_reuses_one_connection_for_sequential_requests():
    async def main():
        async def handler(reader, writer, n):
            writer.write(reply(b'{"n": %d}' % n))
        server, port, conns = await serve(handler)
        client = native.Client(8, 5, 5)
        bodies = []
        for _ in range(5):
            bodies.append(json.loads(await fetch(client, port)))
        client.close()
        server.close()
        return bodies, client.opened, len(conns)

    bodies, opened, accepted = run(main())
    assert bodies == [{"n": i} for i in range(5)]  # the n-th request on one connection
    assert opened == 1 and accepted == 1


def test_a_reply_not_read_to_its_end_closes_its_connection():
    async def main():
        async def handler(reader, writer, n):
            writer.write(reply(b"x" * 10))
        server, port, conns = await serve(handler)
        client = native.Client(8, 5, 5)
        for _ in range(2):
            resp = await client.request("127.0.0.1", port, False, *request_bytes())
            resp.close()  # as the gateway does when its client goes away
        client.close()
        server.close()
        return client.opened

    assert run(main()) == 2


def test_a_connection_the_upstream_closed_while_idle_is_not_reused():
    async def main():
        async def handler(reader, writer, n):
            writer.write(reply(b"{}"))  # keep-alive by HTTP/1.1's default, then closed anyway
            await writer.drain()
            return False
        server, port, conns = await serve(handler)
        client = native.Client(8, 5, 5)
        bodies = []
        for _ in range(3):
            bodies.append(await fetch(client, port))
            await asyncio.sleep(0.05)  # the close reaches the idle connection
        client.close()
        server.close()
        return bodies, client.opened, sum(len(q) for q in client.idle.values())

    bodies, opened, idle = run(main())
    assert bodies == [b"{}"] * 3 and opened == 3 and idle == 0


def test_a_body_without_length_ends_with_the_connection():
    async def main():
        async def handler(reader, writer, n):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\": 1}")
            await writer.drain()
            return False
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 5)
        body = await fetch(client, port)
        server.close()
        return body, client.busy

    assert run(main()) == (b'{"a": 1}', 0)


def test_chunked_replies_are_decoded_however_the_bytes_are_split():
    events = [chunk_event({"content": f"tok{i} "}) for i in range(20)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"

    async def main():
        async def handler(reader, writer, n):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for i in range(0, len(wire), 7):  # 7-byte writes: chunk sizes and CRLFs split apart
                writer.write(wire[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0)
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 5)
        resp = await client.request("127.0.0.1", port, False, *request_bytes())
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        parts = []
        while chunk := await resp.content.readany():
            parts.append(chunk)
        resp.release()
        # the same connection serves the next request: the chunked reply ended cleanly
        await fetch(client, port)
        client.close()
        server.close()
        return parts, client.opened

    parts, opened = run(main())
    assert b"".join(parts) == b"".join(events)
    assert len(parts) > 1  # handed on as it arrived, not buffered to the end
    assert opened == 1


def test_an_upstream_dying_mid_reply_raises_disconnected():
    async def main():
        async def handler(reader, writer, n):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            e = chunk_event({"content": "hi"})
            writer.write(b"%x\r\n%s\r\n" % (len(e), e))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()  # the replica dies: no final chunk
            return False
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 5)
        resp = await client.request("127.0.0.1", port, False, *request_bytes())
        first = await resp.readany()
        with pytest.raises(native.Disconnected):
            while await resp.readany():
                pass
        resp.close()
        server.close()
        return first

    assert run(main()).startswith(b"data: ")


def test_a_connection_closed_before_the_head_raises_disconnected():
    async def main():
        async def handler(reader, writer, n):
            return False  # read the request, close without a word (a stale keep-alive looks so)
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 5)
        with pytest.raises(native.Disconnected):
            await client.request("127.0.0.1", port, False, *request_bytes())
        server.close()
        return client.busy

    assert run(main()) == 0  # the slot came back


@pytest.mark.parametrize("before_head", [True, False])
def test_a_silent_upstream_times_out_after_read_timeout(before_head):
    async def main():
        async def handler(reader, writer, n):
            if not before_head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.sleep(30)
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        resp = None
        with pytest.raises(asyncio.TimeoutError):
            resp = await client.request("127.0.0.1", port, False, *request_bytes())
            assert await resp.readany() == b"hello"
            await resp.readany()
        took = loop.time() - t0
        if resp is not None:
            resp.close()  # as the gateway does (app.py): the slot comes back
        server.close()
        return took, client.busy

    took, busy = run(main())
    assert 0.25 <= took < 2 and busy == 0


def test_data_keeps_a_slow_stream_alive_past_read_timeout():
    async def main():
        async def handler(reader, writer, n):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for _ in range(8):  # 0.8 s in all, each gap 0.1 s: under a 0.3 s timeout
                await asyncio.sleep(0.1)
                writer.write(b"1\r\nx\r\n")
            writer.write(b"0\r\n\r\n")
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 0.3)
        body = await fetch(client, port)
        client.close()
        server.close()
        return body

    assert run(main()) == b"x" * 8


def test_a_reply_nobody_reads_pauses_reading_from_the_upstream():
    big = b"y" * (4 * 1024 * 1024)

    async def main():
        async def handler(reader, writer, n):
            writer.write(reply(big))
            await writer.drain()  # waits while the client holds off
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 5)
        resp = await client.request("127.0.0.1", port, False, *request_bytes())
        await asyncio.sleep(0.3)  # the upstream writes as fast as it may; nobody reads
        held, paused = resp._size, resp._conn.paused
        body = await resp.read()
        resp.release()
        client.close()
        server.close()
        return held, paused, body

    held, paused, body = run(main())
    assert paused and held < native.HIGH_WATER + 1024 * 1024  # not the 4 MB sent
    assert body == big  # and all of it once read


def test_a_refused_connection_raises_connect_failed():
    async def main():
        client = native.Client(8, 5, 5)
        with pytest.raises(native.ConnectFailed):
            await client.request("127.0.0.1", free_port(), False, *request_bytes())
        return client.busy

    assert run(main()) == 0


def test_requests_past_the_cap_wait_for_a_free_connection():
    async def main():
        async def handler(reader, writer, n):
            await asyncio.sleep(0.1)
            writer.write(reply(b"{}"))
        server, port, conns = await serve(handler)
        client = native.Client(1, 5, 5)

        bodies = await asyncio.gather(*(fetch(client, port) for _ in range(4)))
        client.close()
        server.close()
        return bodies, len(conns), client.busy

    bodies, accepted, busy = run(main())
    assert bodies == [b"{}"] * 4 and accepted == 1 and busy == 0


def test_a_reply_that_is_not_http_raises_bad_reply():
    async def main():
        async def handler(reader, writer, n):
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        server, port, _ = await serve(handler)
        client = native.Client(8, 5, 5)
        with pytest.raises(native.BadReply):
            await client.request("127.0.0.1", port, False, *request_bytes())
        server.close()

    run(main())


@pytest.mark.parametrize("which", ["native", "aiohttp"])
def test_the_gateway_relays_streams_and_bodies_on_either_client(tmp_path, which):
    chunks = [chunk_event({"content": w}) for w in ("Hello", " there")] + [b"data: [DONE]\n\n"]
    body = {"model": "raw", "messages": [{"role": "user", "content": "hi"}]}
    with RawUpstream(chunks=chunks) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, limits={"upstream_client": which})) as gw:
        assert gw.app.upstreams.native is (which == "native")
        with httpx.Client(timeout=30) as http:  # one client connection: the upstream's is reused too
            replies = [http.post(gw.base_url + "/chat/completions", json={**body, "stream": True},
                                 headers=AUTH) for _ in range(3)]
    for r in replies:
        assert r.status_code == 200
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text)
                       if isinstance(e, dict)) == "Hello there"
    if which == "native":
        assert gw.app.upstreams.client().opened == 1


def test_a_stream_broken_off_mid_way_ends_in_an_error_event_on_the_native_client(tmp_path):
    class Dying(RawUpstream):
        async def _chat(self, request):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(chunk_event({"content": "Hello"}))
            await asyncio.sleep(0.05)
            request.transport.abort()  # the replica dies mid-stream
            return resp

    with Dying() as up, GatewayServer(make_cfg(tmp_path, {"raw": up.base_url})) as gw:
        r = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=30, json={
            "model": "raw", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["content"] == "Hello"
    assert events[-1]["error"]["code"] == "bad_gateway"
