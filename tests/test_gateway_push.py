"""The gateway's fast paths give the client the same bytes as the slow ones: SSE relayed from the
upstream's read callback (pump.py, http.ChunkWriter) against the task loop and
ASGI ``send`` that plain uvicorn gets; the per-event filter check's cached skeleton
(sse.StreamRelay._passes); a reply's head held for its body (http.HeadHeld)."""

from __future__ import annotations

import httpx
import pytest
import uvicorn

from gateway_helpers import AUTH, WORD_LISTS, ScriptedUpstream, make_cfg, sse_events, stream_text
from workbench.gateway import client
from workbench.gateway.filter import WordFilter
from workbench.gateway.http import HeadHeld
from workbench.gateway.server import GatewayServer
from workbench.gateway.sse import StreamRelay

# a word split across events, one in a single event after the stream has switched to push
# mode, a Chinese one split, and plain tokens between them
PIECES = ["Hello ", "tok ", "this is a bad", "word here ", "tok ", "tok ", "and ", "badword", " again",
          " tok", " 违禁", "品 end", "tok "]


def relayed(tmp_path, server: str, action: str, encoding: str, monkeypatch) -> tuple[bytes, int]:
    """The decoded body of one streamed chat through the gateway, and how many streams took push mode."""
    pushed = []
    push = client.Response.push
    monkeypatch.setattr(client.Response, "push", lambda self, sink: (pushed.append(1), push(self, sink))[1])
    with ScriptedUpstream(PIECES, delay_s=0.005) as up:
        gw = GatewayServer(make_cfg(tmp_path / server, {"scripted": up.base_url},
                                    filter={"action": action, "output": True}))
        if server == "plain_uvicorn":  # no http.CHUNKS on the scope: the task loop and send()
            gw._server = uvicorn.Server(uvicorn.Config(gw.app, host=gw.host, port=gw.port, http="httptools",
                                                       lifespan="on", log_level="warning"))
        with gw:
            r = httpx.post(gw.base_url + "/chat/completions", json={
                "model": "scripted", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                headers={**AUTH, "Accept-Encoding": encoding}, timeout=30)
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == (None if encoding == "identity" else "gzip")
    return r.content, len(pushed)  # (httpx decodes the gzip stream: it must be whole and valid)


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
@pytest.mark.parametrize("action", ["mask", "block"])
def test_push_mode_relays_the_same_filtered_bytes_as_the_task_loop(tmp_path, monkeypatch, action, encoding):
    (tmp_path / "gateway").mkdir()
    (tmp_path / "plain_uvicorn").mkdir()
    raw = {}
    for server in ("gateway", "plain_uvicorn"):
        monkeypatch.undo()
        raw[server], pushed = relayed(tmp_path, server, action, encoding, monkeypatch)
        assert pushed == (1 if server == "gateway" else 0)
    assert raw["gateway"] == raw["plain_uvicorn"]
    text = stream_text(sse_events(raw["gateway"].decode()))
    assert "badword" not in text and "违禁品" not in text
    if action == "mask":
        assert text == "Hello tok this is a *** here tok tok and *** again tok *** endtok "
    else:
        assert b"content_filter" in raw["gateway"]


def events(*values: str) -> list[bytes]:
    return [b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":'
            b'[{"index":0,"delta":{"content":"' + v.encode() + b'"},"logprobs":null,"finish_reason":null}]}\n\n'
            for v in values]


def test_cached_skeleton_still_checks_every_value():
    """Events that differ from the last passed one only in their text value skip the structural
    checks, never the word check: a word arriving that way is masked, and a value with an
    escaped quote (another structure) goes the slow way."""
    relay = StreamRelay("chat", WordFilter.from_files(WORD_LISTS), False, False, False)
    first = b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":' \
            b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
    out = relay.process(first)
    seq = events("tok ", "tok ", "bad", "word", " tok ", 'say \\"hi\\" ', "tok ")
    for ev in seq:
        out += relay.process(ev)
    assert relay._skeleton is not None
    out += relay.finish()
    text = stream_text(sse_events(out.decode()))
    assert text == 'tok tok *** tok say "hi" tok '
    assert relay.hits == 1 and relay.streamed == 7
    # the plain tokens went out as their own bytes (no JSON round trip)
    assert seq[0] in out and seq[-1] in out


class _Transport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Cycle:
    response_started = False


def test_a_reply_head_goes_out_with_its_first_body_bytes():
    t, cycle = _Transport(), _Cycle()
    held = HeadHeld(t, cycle)
    held.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the reply starts: never held
    assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    held.write(b"HEAD")
    assert len(t.writes) == 1  # held
    held.write(b"BODY")
    held.write(b"MORE")
    assert t.writes[1:] == [b"HEADBODY", b"MORE"]


@pytest.mark.parametrize("end", ["flush", "close"])
def test_a_held_head_without_body_goes_out_at_the_reply_end(end):
    t, cycle = _Transport(), _Cycle()
    cycle.response_started = True
    held = HeadHeld(t, cycle)
    held.write(b"HEAD")
    getattr(held, end)()
    assert t.writes == [b"HEAD"] and t.closed == (end == "close")
