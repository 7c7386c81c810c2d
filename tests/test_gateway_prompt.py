"""Issue 31, prompt side: every text-carrying field filtered or refused (finding 3), moderation
over the filter's folding (4), the remaining evasions (5), a large prompt off the loop (13)."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from gateway_helpers import (AUTH, TOKENIZER, WORD_LISTS, ScriptedUpstream, assert_openai_error, counted,
                             make_cfg)
from workbench.gateway.filter import WordFilter
from workbench.gateway.server import GatewayServer
from workbench.testing.fakeserver import FakeServer

USER = {"role": "user", "content": "hello"}
BOMB = r"\bhow (do|to) (i )?make (a )?(bomb|explosive)s?\b"
TOOL = {"type": "function", "function": {"name": "lookup", "description": "say badword", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "description": "a badword here"}}}}}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "badword"}'}}]}

# field -> (extra request fields, where the masked text is found in what the upstream got)
FIELDS = {
    "tools": ({"tools": [TOOL]}, lambda b: b["tools"][0]["function"]["description"]),
    "tool_call_arguments": ({"messages": [USER, CALL, {"role": "tool", "tool_call_id": "c1", "content": "x"}]},
                            lambda b: b["messages"][1]["tool_calls"][0]["function"]["arguments"]),
    "name": ({"messages": [{**USER, "name": "badword"}]}, lambda b: b["messages"][0]["name"]),
    "reasoning_content": ({"messages": [USER, {"role": "assistant", "content": "ok",
                                               "reasoning_content": "badword"}, USER]},
                          lambda b: b["messages"][1]["reasoning_content"]),
}


def post(gw, body, path="/chat/completions"):
    return httpx.post(gw.base_url + path, json=body, headers=AUTH, timeout=30)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_every_text_field_of_a_chat_prompt_is_filtered(tmp_path, field):
    extra, where = FIELDS[field]
    body = {"model": "scripted", "messages": [USER], **extra}
    with ScriptedUpstream(["ok"]) as up:
        with GatewayServer(make_cfg(tmp_path, {"scripted": up.base_url})) as gw:
            assert_openai_error(post(gw, body), 400, "content_filter")
        with GatewayServer(make_cfg(tmp_path / "m", {"scripted": up.base_url}, filter={"action": "mask"})) as gw:
            assert post(gw, body).status_code == 200
        assert "badword" not in str(up.bodies[-1]) and "***" in where(up.bodies[-1])


def test_a_chat_template_is_refused_while_the_filter_is_on(tmp_path):
    body = {"model": "scripted", "messages": [USER], "chat_template": "{{ 'bad' + 'word' }}"}
    with ScriptedUpstream(["ok"]) as up:
        with GatewayServer(make_cfg(tmp_path, {"scripted": up.base_url})) as gw:
            err = assert_openai_error(post(gw, body), 400, "unfilterable_field")
            assert err["param"] == "chat_template"
        with GatewayServer(make_cfg(tmp_path / "off", {"scripted": up.base_url}, filter={"enabled": False})) as gw:
            assert post(gw, body).status_code == 200


def test_suffix_and_token_id_prompts_are_filtered(tmp_path):
    from workbench.gateway.tokens import load_tokenizer

    ids = load_tokenizer(TOKENIZER).encode("say badword", add_special_tokens=False).ids
    clean = load_tokenizer(TOKENIZER).encode("say hello", add_special_tokens=False).ids
    comp = {"model": "fake-model", "max_tokens": 2}
    with FakeServer() as fake:
        with GatewayServer(make_cfg(tmp_path, {"fake-model": fake.base_url})) as gw:
            assert_openai_error(post(gw, {**comp, "prompt": "hi", "suffix": "badword"}, "/completions"),
                                400, "content_filter")
            assert_openai_error(post(gw, {**comp, "prompt": clean}, "/completions"), 400, "unfilterable_field")
        with GatewayServer(counted(make_cfg(tmp_path / "t", {"fake-model": fake.base_url}))) as gw:
            assert_openai_error(post(gw, {**comp, "prompt": ids}, "/completions"), 400, "content_filter")
            assert post(gw, {**comp, "prompt": clean}, "/completions").status_code == 200
            assert_openai_error(post(gw, {"model": "fake-model", "input": ids}, "/embeddings"), 400,
                                "content_filter")


@pytest.mark.parametrize("text", ["how to  make a bomb", "how to\u00a0make a bomb", "how to make a b\u200bomb",
                                  "ｈｏｗ to make a bomb", "how to mаke a bomb", "how to\nmake a bomb",
                                  "how\tto make  a\u3000bomb"])
def test_keyword_moderation_reads_the_folded_text(tmp_path, text):
    with ScriptedUpstream(["ok"]) as up, GatewayServer(make_cfg(
            tmp_path, {"scripted": up.base_url}, moderation={"patterns": [BOMB]})) as gw:
        r = post(gw, {"model": "scripted", "messages": [{"role": "user", "content": text}]})
        assert_openai_error(r, 400, "content_moderation")
        assert post(gw, {"model": "scripted", "messages": [USER]}).status_code == 200


EVASIONS = ["b\u17b4adword", "bad\u180bword", "badw\ufff0ord", "bad\u0483word",  # invisible
            "b\u0251dword", "badw\u00f8rd", "ba\u0111word", "\u0299adword", "ꓐꓮꓓword", "⒝adword",  # look-alikes
            "forbidden  phrase", "forbidden\tphrase", "forbidden \n phrase",  # whitespace runs
            "制作炸弾", "敏.感.词", "敏-感*词"]  # a kanji form, punctuation between Han characters


@pytest.fixture(scope="module")
def words() -> WordFilter:
    return WordFilter.from_files(WORD_LISTS)


@pytest.mark.parametrize("text", EVASIONS)
def test_remaining_evasions_are_caught_in_text_and_streams(words, text):
    wrapped = f"say {text} now"
    assert words.apply_mask(wrapped) == ("say *** now", 1), text
    rng = random.Random(0)
    for _ in range(50):  # any split of a stream masks the same
        cuts = sorted(rng.sample(range(1, len(wrapped)), rng.randint(1, 6)))
        sf = words.stream()
        out = "".join(sf.feed(wrapped[a:b]) for a, b in zip([0, *cuts], [*cuts, len(wrapped)])) + sf.flush()
        assert out == "say *** now", (text, cuts)


def test_look_alike_letters_fold_to_latin():
    from workbench.gateway.normalize import fold

    assert fold("ɑ ø đ ʙ ꓐꓮꓓ ⒝") == "a o d b bad b"
    assert fold("制作炸弾") == "制作炸弹"


def test_clause_punctuation_still_separates_chinese_phrases(words):
    assert not words.hits("它很敏感，词语") and not words.hits("很敏感。词典") and words.hits("敏·感·词")


def test_a_large_prompt_is_matched_off_the_event_loop(tmp_path):
    # Issue 31 finding 13: a 2 MB prompt with a match held the loop for 0.15-0.5 s. The loop's
    # own lag is measured inside the gateway (a 5 ms timer), so the client's work does not count.
    import asyncio
    import time

    text = ("lorem ipsum dólor sit\n amet 敏感 " * 60000)[:1_600_000] + " badword"
    body = json.dumps({"model": "scripted", "messages": [{"role": "user", "content": text}]},
                      ensure_ascii=False).encode()  # ~1.8 MB, under the 2 MiB body limit
    with ScriptedUpstream(["ok"]) as up, GatewayServer(make_cfg(tmp_path, {"scripted": up.base_url})) as gw:
        loop = gw._server.servers[0].get_loop()
        lags, stop = [], asyncio.Event()

        async def monitor():
            while not stop.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t0 - 0.005)
        fut = asyncio.run_coroutine_threadsafe(monitor(), loop)
        r = httpx.post(gw.base_url + "/chat/completions", content=body, timeout=60,
                       headers={**AUTH, "content-type": "application/json"})
        assert_openai_error(r, 400, "content_filter")
        loop.call_soon_threadsafe(stop.set)
        fut.result(10)
    # old code: the match alone held the loop ~0.3 s (0.15-0.9 s on this 2-core machine)
    assert max(lags) < 0.2, sorted(lags)[-5:]
