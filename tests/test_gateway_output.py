"""Issue 31, output side: log-probabilities filtered with the text they spell (finding 2), and the
output fields that passed unfiltered (finding 14), over HTTP against scripted upstreams."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from gateway_helpers import AUTH, RawUpstream, assert_openai_error, chat_reply, chunk_event, make_cfg, sse_events
from workbench.gateway.server import GatewayServer

CHAT = {"model": "raw", "messages": [{"role": "user", "content": "hello there"}], "logprobs": True,
        "top_logprobs": 2}
TOKENS = ["it", " is", " bad", "word", " ok"]


def entry(token: str, alt: str = "x") -> dict:
    return {"token": token, "logprob": -0.1, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": -0.1, "bytes": None},
                             {"token": alt, "logprob": -2.0, "bytes": None}]}


def post(gw, body):
    return httpx.post(gw.base_url + "/chat/completions", json=body, headers=AUTH, timeout=30)


def _reply_with_logprobs(tokens: list[str], alts: dict | None = None) -> bytes:
    obj = json.loads(chat_reply({"content": "".join(tokens)}))
    obj["choices"][0]["logprobs"] = {"content": [entry(t, (alts or {}).get(i, "x")) for i, t in enumerate(tokens)]}
    return json.dumps(obj).encode()


def _all_tokens(lp_entries: list[dict]) -> str:
    return json.dumps([[e["token"], [a["token"] for a in e.get("top_logprobs") or ()]] for e in lp_entries])


def test_masked_words_do_not_leak_through_logprobs(tmp_path):
    with RawUpstream(_reply_with_logprobs(TOKENS)) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": "mask"})) as gw:
        r = post(gw, CHAT)
    ch = r.json()["choices"][0]
    assert ch["message"]["content"] == "it is *** ok"
    toks = [e["token"] for e in ch["logprobs"]["content"]]
    assert "".join(toks) == "it is *** ok" and "bad" not in _all_tokens(ch["logprobs"]["content"])
    assert ch["logprobs"]["content"][0]["top_logprobs"]  # untouched entries keep their alternatives


def test_an_alternative_token_that_completes_a_listed_word_is_dropped(tmp_path):
    with RawUpstream(_reply_with_logprobs(["it", " is", " bad", " ok"], alts={3: "word"})) as up, \
            GatewayServer(make_cfg(tmp_path, {"raw": up.base_url}, filter={"action": "mask"})) as gw:
        ch = post(gw, CHAT).json()["choices"][0]
    assert ch["message"]["content"] == "it is bad ok"
    assert [a["token"] for a in ch["logprobs"]["content"][3]["top_logprobs"]] == [" ok"]


def test_completion_logprobs_are_filtered_too(tmp_path):
    lp = {"tokens": TOKENS, "token_logprobs": [-0.1] * 5, "top_logprobs": [{t: -0.1} for t in TOKENS],
          "text_offset": [0, 2, 5, 9, 13]}
    body = json.dumps({"id": "x", "object": "text_completion", "model": "raw", "choices": [
        {"index": 0, "text": "".join(TOKENS), "logprobs": lp, "finish_reason": "stop"}]}).encode()

    class Completions(RawUpstream):
        path = "/v1/completions"

    with Completions(body) as up, GatewayServer(make_cfg(tmp_path, {"raw": up.base_url},
                                                         filter={"action": "mask"})) as gw:
        r = httpx.post(gw.base_url + "/completions", json={"model": "raw", "prompt": "hi", "logprobs": 1},
                       headers=AUTH, timeout=30)
    ch = r.json()["choices"][0]
    assert ch["text"] == "it is *** ok" and "bad" not in json.dumps(ch["logprobs"])
    assert ch["logprobs"]["tokens"] == ["it", " is", " ***", "", " ok"]


def _stream_chunks(gate: threading.Event | None = None) -> list:
    chunks = []
    for i, t in enumerate(TOKENS):
        ev = json.loads(chunk_event({"content": t}, "stop" if i == len(TOKENS) - 1 else None)[6:])
        ev["choices"][0]["logprobs"] = {"content": [entry(t)]}
        chunks.append(b"data: " + json.dumps(ev).encode() + b"\n\n")
        if gate is not None and t == "word":
            chunks.append(gate)
    return chunks + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("action", ["mask", "block"])
def test_streamed_logprobs_hold_back_with_their_text(tmp_path, action):
    with RawUpstream(chunks=_stream_chunks()) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": action})) as gw:
        events = sse_events(post(gw, {**CHAT, "stream": True}).text)
    choices = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
    lps = [x for ch in choices for x in ((ch.get("logprobs") or {}).get("content") or ())]
    assert "bad" not in _all_tokens(lps) and "word" not in _all_tokens(lps)
    if action == "mask":
        text = "".join(ch["delta"].get("content") or "" for ch in choices)
        assert text == "it is *** ok" and "".join(e["token"] for e in lps) == text
    else:
        assert events[-2]["error"]["code"] == "content_filter"


def test_a_blocked_word_never_arrives_before_the_block(tmp_path):
    # the stream stalls right after "word": what the client has by then must not hold "bad"+"word"
    gate = threading.Event()
    with RawUpstream(chunks=_stream_chunks(gate)) as up, GatewayServer(make_cfg(
            tmp_path, {"raw": up.base_url}, filter={"action": "block"})) as gw:
        got = b""
        with httpx.Client(timeout=30) as c, c.stream("POST", gw.base_url + "/chat/completions",
                                                     json={**CHAT, "stream": True}, headers=AUTH) as r:
            for chunk in r.iter_bytes():
                got += chunk
                if b'" bad"' in got or b'"bad"' in got:
                    break
                if b"[DONE]" in got:
                    break
                gate.set()
        gate.set()
    assert b"bad" not in got


def test_plain_events_pass_as_bytes_and_split_words_are_still_masked():
    from gateway_helpers import WORD_LISTS
    from workbench.gateway.filter import WordFilter
    from workbench.gateway.sse import EventSplitter, StreamRelay

    def ev(text, fin=None):
        return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                       "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                                    "finish_reason": fin}]}, separators=(",", ":")).encode() + b"\n\n"
    relay = StreamRelay("chat", WordFilter.from_files(WORD_LISTS), False, False, False)
    split = EventSplitter()
    plain = [ev("it"), ev(" is"), ev(" fine")]
    assert [relay.process(split.feed(e)) for e in plain] == plain  # byte for byte
    out = b"".join(relay.process(split.feed(e)) for e in [ev(" bad"), ev("wo"), ev("rd"), ev(" ok", "stop")])
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(out.decode()))
    assert text == " *** ok" and relay.streamed == 7


def test_a_chunk_holding_a_whole_reply_parses_only_its_first_and_last_events(monkeypatch):
    """A fast server's reply can arrive in one read: the events after the first (which sets the
    template) take the bytes fast path too, and the masking stays right."""
    from gateway_helpers import WORD_LISTS
    from workbench.gateway.filter import WordFilter
    from workbench.gateway.sse import StreamRelay

    def ev(text, fin=None):
        return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                       "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                                    "finish_reason": fin}]}, separators=(",", ":")).encode() + b"\n\n"
    relay = StreamRelay("chat", WordFilter.from_files(WORD_LISTS), False, False, False)
    parsed = []
    real = relay._event
    monkeypatch.setattr(relay, "_event", lambda e: parsed.append(e) or real(e))
    events = [ev(""), *(ev(t) for t in ("it", " is", " fine", " and", " so", " on")), ev("", "stop")]
    assert relay.process(b"".join(events)) == b"".join(events) and len(parsed) == 2
    out = relay.process(b"".join([ev(" a"), ev(" bad"), ev("word"), ev(" ok", "stop")]))
    assert b"badword" not in out and b"***" in out
