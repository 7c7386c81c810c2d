"""Issue 31 findings 7 and 8: one key's slow bodies cannot fill the connection cap and starve
/health; a client that never reads its reply is dropped after http.send_timeout_s."""

from __future__ import annotations

import json
import socket
import time

import httpx
from aiohttp import web

from gateway_helpers import KEY, RawUpstream, chat_reply
from test_gateway_http import FAST, GatewayProcess
from workbench.testing.fakeserver import FakeServer


def _slow_body(gw) -> socket.socket:
    s = gw.connect()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode() +
              b"\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\"")
    return s


def test_one_key_cannot_fill_the_connection_cap_with_slow_bodies(tmp_path):
    # old gateway: 8 slow bodies of one key held all 8 connections; /health got 503 or a reset
    with FakeServer() as fake, GatewayProcess(tmp_path, fake.base_url, http={
            **FAST, "body_timeout_s": 30, "max_client_connections": 8, "max_key_share": 0.5}) as gw:
        socks = [_slow_body(gw) for _ in range(8)]
        time.sleep(0.5)
        statuses = [httpx.get(gw.url + "/health", timeout=5).status_code for _ in range(5)]
        refused = 0
        for s in socks[4:]:  # past the key's share: answered 429 at once, their bodies unread
            s.settimeout(0.5)
            try:
                refused += s.recv(4096).startswith(b"HTTP/1.1 429")
            except (TimeoutError, OSError):
                pass
        for s in socks:
            s.close()
    assert statuses == [200] * 5
    assert refused == 4


def test_a_client_that_never_reads_its_reply_is_dropped(tmp_path):
    # old gateway: 8 clients not reading 30 MB replies held 386 MB until they closed
    big = chat_reply({"content": "x" * (8 << 20)})
    with RawUpstream(big) as up, GatewayProcess(tmp_path, up.base_url, http={**FAST, "send_timeout_s": 1},
                                                filter={"enabled": False}, moderation={"policy": None}) as gw:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", gw.port))
        body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode() +
                  b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        time.sleep(4)  # read nothing: the gateway drops the connection and the reply it buffered
        s.settimeout(5)
        got = 0
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass
        s.close()
    assert got < len(big)  # what the kernel buffers held, not the whole reply


class _CountingStream(RawUpstream):
    """Writes ``n`` events of 16 KiB each, counting the bytes its writes got through."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.written = n, 0

    async def _chat(self, request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = b'data: {"id":"x","object":"chat.completion.chunk","model":"raw","choices":[{"index":0,' \
                b'"delta":{"content":"' + b"x" * (16 << 10) + b'"},"finish_reason":null}]}\n\n'
        try:
            for _ in range(self.n):
                await resp.write(event)
                self.written += len(event)
        except (ConnectionError, OSError):
            pass
        return resp


def test_a_stream_client_that_never_reads_holds_the_upstream_and_is_dropped(tmp_path):
    """Push mode (relay.py) writes events from the upstream's read callback: a client's full send
    buffer must stop reading from the upstream (not buffer the stream here), and the send
    timeout still drops the client, with a 408 in the audit row."""
    up = _CountingStream(4096)  # 64 MiB of events
    with up, GatewayProcess(tmp_path, up.base_url, http={**FAST, "send_timeout_s": 1},
                            filter={"output": True}) as gw:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", gw.port))
        body = json.dumps({"model": "fake-model", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode() +
                  b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        time.sleep(4)  # read nothing
        s.close()
        rows = gw.audit()
    assert up.written < 32 << 20  # held: socket buffers' worth, not the 64 MiB stream
    assert [r[1] for r in rows] == [408]
