"""What the gateway does with what an upstream sends back, over HTTP against misbehaving
upstreams (tests/gateway_helpers.RawUpstream): every text field filtered, SSE framed with CR or
CRLF, a 200 that is not JSON, usage of the wrong type; and the media-host allow-list."""

from __future__ import annotations

import json
import sqlite3
import threading

import httpx
import pytest

from gateway_helpers import (AUTH, RawUpstream, ScriptedUpstream, assert_openai_error, chat_reply,
                             chunk_event, make_cfg, sse_events)
from workbench.testing.fakeserver import FakeServer
from workbench.gateway.server import GatewayServer

CHAT = {"model": "raw", "messages": [{"role": "user", "content": "hello there"}]}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "badword"}'}}


def post(gw, body, headers=AUTH):
    return httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers, timeout=30)


def rows(gw) -> list[dict]:
    gw.app.audit.close()
    conn = sqlite3.connect(gw.cfg.audit.path)
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]


# ---- finding 8: every text field the gateway returns is filtered -------------------------------
@pytest.mark.parametrize("field", ["reasoning_content", "tool_calls"])
@pytest.mark.parametrize("action", ["block", "mask"])
def test_filter_covers_reasoning_and_tool_call_arguments(tmp_path, field, action):
    message = {"content": None, "reasoning_content": "think: badword"} if field == "reasoning_content" \
        else {"content": None, "tool_calls": [TOOL_CALL]}
    with RawUpstream(chat_reply(message)) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": action})) as gw:
        r = post(gw, CHAT)
        if action == "block":
            assert_openai_error(r, 403, "content_filter")
        else:
            msg = r.json()["choices"][0]["message"]
            text = msg["reasoning_content"] if field == "reasoning_content" else \
                msg["tool_calls"][0]["function"]["arguments"]
            assert text == ("think: ***" if field == "reasoning_content" else '{"q": "***"}')
            assert msg["tool_calls" if field == "tool_calls" else "reasoning_content"]  # field kept


@pytest.mark.parametrize("action", ["block", "mask"])
def test_filter_covers_streamed_reasoning_and_tool_call_deltas(tmp_path, action):
    def call(args: str, first: bool = False) -> dict:
        tc = {"index": 0, "function": {"arguments": args}}
        return {"tool_calls": [{**tc, "id": "call_1", "type": "function",
                                "function": {"name": "lookup", "arguments": args}} if first else tc]}

    chunks = [chunk_event({"role": "assistant", "reasoning_content": "I will say bad"}),
              chunk_event({"reasoning_content": "word now"}),
              chunk_event(call('{"q": "bad', first=True)), chunk_event(call('wor')), chunk_event(call('d"}')),
              chunk_event({}, "tool_calls"), b"data: [DONE]\n\n"]
    with RawUpstream(chunks=chunks) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": action})) as gw:
        events = sse_events(post(gw, {**CHAT, "stream": True}).text)
    body = json.dumps(events)
    assert "badword" not in body and "wor" not in body.replace("word now", "")
    if action == "block":
        assert events[-2]["error"]["code"] == "content_filter" and events[-1] == "[DONE]"
    else:
        deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        args = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls") or ())
        assert reasoning == "I will say *** now" and args == '{"q": "***"}'
        assert events[-1] == "[DONE]"


# ---- finding 10: SSE with CR or CRLF line endings is split into events ------------------------
@pytest.mark.parametrize("sep", [b"\r\n\r\n", b"\r\r"], ids=["crlf", "cr"])
def test_cr_and_crlf_framed_events_are_relayed_one_by_one_and_filtered(tmp_path, sep):
    go = threading.Event()  # the upstream sends the rest only once the client has the first event
    chunks = [chunk_event({"role": "assistant", "content": "first"}, sep=sep), go,
              chunk_event({"content": " then bad"}, sep=sep)[:-1], chunk_event({"content": "word"}, sep=sep)[-1:],
              chunk_event({"content": "word"}, sep=sep), chunk_event({}, "stop", sep=sep), b"data: [DONE]" + sep]
    with RawUpstream(chunks=chunks) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": "mask"})) as gw:
        received = b""
        with httpx.Client(timeout=15) as client, client.stream(
                "POST", gw.base_url + "/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
            for part in r.iter_bytes():  # decoded: httpx asks for gzip
                received += part
                if b"first" in received:
                    go.set()  # before the fix the whole stream came at its end: this never ran
        assert go.is_set()
    events = sse_events(received.replace(b"\r\n", b"\n").decode())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict))
    assert text == "first then ***" and events[-1] == "[DONE]"


# ---- finding 11: a 200 that is not JSON, usage of the wrong type ------------------------------
@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"choices": [', b"[1, 2]"])
def test_a_200_reply_that_is_not_a_json_object_is_502(tmp_path, body):
    with RawUpstream(body) as up, GatewayServer(make_cfg(tmp_path, {"raw": up.base_url})) as gw:
        err = assert_openai_error(post(gw, CHAT), 502, "bad_gateway")
        assert "oops" not in err["message"]
        assert [(r["status"], r["route"]) for r in rows(gw)] == [(502, "/v1/chat/completions")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_usage_of_the_wrong_type_is_not_counted_and_the_row_is_written(tmp_path, stream):
    usage = {"prompt_tokens": "12", "completion_tokens": [5], "total_tokens": None}
    chunks = [chunk_event({"role": "assistant", "content": "one"}), chunk_event({"content": " two"}, "stop"),
              b'data: {"id":"x","choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n",
              b"data: [DONE]\n\n"]
    up = RawUpstream(chunks=chunks) if stream else RawUpstream(chat_reply({"content": "one two"}, usage))
    with up, GatewayServer(make_cfg(tmp_path, {"raw": up.base_url}, key={"tokens_per_minute": 1000})) as gw:
        r = post(gw, {**CHAT, "stream": stream, "max_tokens": 50})
        assert r.status_code == 200
        # the gateway still serves (a key with a token limit: the bad usage was settled)
        assert post(gw, {**CHAT, "stream": stream, "max_tokens": 50}).status_code == 200
        row = rows(gw)[0]
    assert row["status"] == 200 and row["prompt_tokens"] is None
    assert row["completion_tokens"] == (2 if stream else None)  # a stream: its text events
    assert "usage.prompt_tokens" in row["error"]


def test_huge_usage_counts_do_not_stop_the_audit(tmp_path):
    usage = {"prompt_tokens": 2 ** 64 - 1, "completion_tokens": 10 ** 23, "total_tokens": 1}
    with RawUpstream(chat_reply({"content": "hi"}, usage)) as up, GatewayServer(
            make_cfg(tmp_path, {"raw": up.base_url})) as gw:
        assert [post(gw, CHAT).status_code for _ in range(4)] == [200] * 4
        got = rows(gw)
    assert len(got) == 4 and {(r["prompt_tokens"], r["completion_tokens"]) for r in got} == {(None, None)}


# ---- finding 19: media URLs in content parts --------------------------------------------------
def _image(url: str) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.mark.parametrize("url,ok", [
    ("https://images.example.com/cat.png", True),
    ("https://a.cdn.example.org/cat.png", True),
    ("data:image/png;base64,iVBORw0KGgo=", True),
    ("http://169.254.169.254/latest/meta-data/", False),
    ("http://images.example.com@169.254.169.254/", False),
    ("http://images.example.com.evil.net/x.png", False),
    ("file:///etc/passwd", False),
    ("ftp://images.example.com/x.png", False),
    ("http://[::1/x", False),
])
def test_media_urls_outside_the_allow_list_are_refused(tmp_path, url, ok):
    with FakeServer() as fake, GatewayServer(make_cfg(tmp_path, {"fake-model": fake.base_url}, limits={
            "media_hosts": ["images.example.com", "*.cdn.example.org"]})) as gw:
        r = post(gw, _image(url))
        if ok:
            assert r.status_code == 200, r.text
        else:
            err = assert_openai_error(r, 400, "media_url_not_allowed")
            assert err["param"] == "messages.0.content.1.image_url" and "169.254" not in err["message"]


def test_audio_and_video_urls_are_checked_too_and_no_list_allows_any(tmp_path):
    body = {"model": "scripted", "messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}},
        {"type": "video_url", "video_url": "http://10.0.0.1/v.mp4"}]}]}
    with ScriptedUpstream(["ok"]) as up:
        with GatewayServer(make_cfg(tmp_path, {"scripted": up.base_url}, limits={"media_hosts": []})) as gw:
            assert_openai_error(post(gw, body), 400, "media_url_not_allowed")
        with GatewayServer(make_cfg(tmp_path / "open", {"scripted": up.base_url})) as gw:
            assert post(gw, body).status_code == 200  # media_hosts unset: the old behaviour


# ---- finding 9 over HTTP: evasive prompts are blocked, or masked in place --------------------
@pytest.mark.parametrize("text", ["ｂａｄｗｏｒｄ", "bad\u200bword", "bad\u00adword", "bаdwоrd", "敏 感 词", "敏感詞"])
def test_evasive_spellings_in_prompts_are_blocked_and_masked(tmp_path, text):
    with ScriptedUpstream(["ok"]) as up:
        with GatewayServer(make_cfg(tmp_path, {"scripted": up.base_url})) as gw:
            body = {"model": "scripted", "messages": [{"role": "user", "content": f"say {text} now"}]}
            assert_openai_error(post(gw, body), 400, "content_filter")
        with GatewayServer(make_cfg(tmp_path / "mask", {"scripted": up.base_url}, filter={"action": "mask"})) as gw:
            assert post(gw, body).status_code == 200
        assert up.bodies[-1]["messages"][0]["content"] == "say *** now"
