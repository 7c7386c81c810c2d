"""The sensitive-word filter and the stream relay, without sockets."""

from __future__ import annotations

import json
import random

import pytest

from gateway_helpers import WORD_LISTS
from workbench.gateway.filter import WordFilter
from workbench.gateway.sse import GzipStream, StreamRelay

TEXT = "A BadWord here, 敏感词 there, a forbidden phrase, and bad at the end"


@pytest.fixture(scope="module")
def words() -> WordFilter:
    return WordFilter.from_files(WORD_LISTS)


def test_shipped_lists_load_in_both_languages(words):
    assert words.size >= 8 and words.hits("请不要提到违禁品") and words.hits("MAKE A PIPE BOMB")
    assert not words.hits("a perfectly fine sentence, 一句正常的话")


def test_mask_replaces_each_match_and_keeps_the_rest(words):
    assert words.apply_mask(TEXT) == ("A *** here, *** there, a ***, and bad at the end", 3)


def test_any_split_of_a_stream_masks_like_the_whole_text(words):
    rng = random.Random(0)
    expect = words.apply_mask(TEXT)[0]
    for _ in range(500):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(1, 20)))
        pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)])]
        sf = words.stream()
        out = "".join(sf.feed(p) for p in pieces) + sf.flush()
        assert out == expect and sf.hits == 3, pieces


def test_stream_holds_back_only_a_possible_word_start(words):
    sf = words.stream()
    assert sf.feed("hello world ") == "hello world "  # nothing here can start a word
    assert sf.feed("and b") == "and "  # "b" may become "badword"
    assert sf.feed("ye") == "bye"


def test_overlapping_words_mask_as_one_span():
    f = WordFilter(["abc", "bcd"])
    assert f.apply_mask("xabcdx") == ("x***x", 1)
    sf = f.stream()
    assert "".join(sf.feed(c) for c in "xabcdx") + sf.flush() == "x***x"


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"


def test_relay_without_filter_passes_bytes_and_strips_only_the_usage_chunk():
    relay = StreamRelay("chat", None, block=True, strip_usage=True, collect=False)
    data = _chunk("hi") + _chunk(" there", "stop")
    assert relay.process(data) is data
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    assert relay.process(usage + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert relay.usage == {"prompt_tokens": 3, "completion_tokens": 2}


def test_relay_flushes_held_text_into_the_finish_chunk(words):
    relay = StreamRelay("chat", words, block=False, strip_usage=False, collect=True)
    out = relay.process(_chunk("say b")) + relay.process(_chunk("adword", None)) + \
        relay.process(_chunk(None, "stop") + b"data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in out.decode().split("\n\n") if e.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "say ***"
    assert relay.done and relay.texts == ["say ", "***"]


@pytest.mark.parametrize("backend", ["zlib_ng", "zlib"])
def test_gzip_stream_is_decodable_by_the_standard_library_after_every_chunk(backend):
    """zlib-ng (what the gateway uses where installed) and the standard library's fallback both
    write one gzip member a client inflates event by event, long and non-ASCII events included."""
    import zlib

    from workbench.gateway.sse import DEFLATE

    assert DEFLATE.__name__.endswith("zlib_ng")  # the default, installed by setup.sh (the gateway extra)
    gz, d = GzipStream(zlib if backend == "zlib" else None), zlib.decompressobj(31)
    assert (type(gz.z) is type(zlib.compressobj())) == (backend == "zlib")  # the backend asked for
    texts = [f"t{i}" for i in range(5)] + ["敏 感 — ünïcode", "x" * 70_000, "t5"]
    for text in texts:
        assert d.decompress(gz.chunk(_chunk(text))) == _chunk(text)
    assert d.decompress(gz.end(b"data: [DONE]\n\n")) == b"data: [DONE]\n\n" and d.eof


# ---- Unicode evasion (issue 14, finding 9) ----------------------------------------------------
EVASIONS = [
    ("a ｂａｄｗｏｒｄ here", "a *** here"),  # full-width letters
    ("a bad\u200bword here", "a *** here"),  # zero-width space
    ("a bad\u00adword here", "a *** here"),  # soft hyphen
    ("a b\u200da\u2060d\ufeffword here", "a *** here"),  # joiners, word joiner, BOM
    ("a bаdwоrd here", "a *** here"),  # Cyrillic а and о
    ("a ΒΑDWORD here", "a *** here"),  # Greek capitals
    ("a 𝐛𝐚𝐝𝐰𝐨𝐫𝐝 here", "a *** here"),  # mathematical bold (astral characters)
    ("a b\u0336a\u0336d\u0336word here", "a *** here"),  # combining strike-through overlay
    ("a bádwörd here", "a *** here"),  # accents
    ("这是敏 感 词吗", "这是***吗"),  # spaced Chinese
    ("这是敏\u3000感\n词吗", "这是***吗"),  # ideographic space, newline
    ("这是敏感詞吗", "这是***吗"),  # traditional 詞
    ("買違禁品", "買***"),  # traditional 違 inside, a traditional character outside stays
    ("請勿製作炸彈", "請勿***"),  # 製作炸彈 -> 制作炸弹
]


@pytest.mark.parametrize("text,masked", EVASIONS)
def test_look_alike_spellings_are_caught_and_masked_in_place(words, text, masked):
    assert words.hits(text)
    assert words.apply_mask(text) == (masked, 1)


@pytest.mark.parametrize("text", ["was sad", "a bad word", "bad-word", "敏感 的词", "它很敏感，词语"])
def test_folding_adds_no_match_across_english_word_boundaries(words, text):
    assert not words.hits(text)


def test_any_split_of_an_evasive_stream_masks_like_the_whole_text(words):
    rng = random.Random(1)
    text = "".join(t for t, _ in EVASIONS)
    expect, n = words.apply_mask(text)
    assert n == len(EVASIONS)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        sf = words.stream()
        out = "".join(sf.feed(p) for p in pieces) + sf.flush()
        assert out == expect, pieces


def test_cjk_space_insensitivity_can_be_turned_off():
    f = WordFilter(["敏感词"], cjk_ignore_spaces=False)
    assert not f.hits("敏 感 词") and f.hits("敏感詞")


def test_folding_keeps_kana_voicing_apart():
    f = WordFilter(["がん"])  # NFKD splits off the voicing mark; it is kept, not dropped
    assert f.hits("これはがんです") and not f.hits("これはかんです")


# ---- SSE framing (finding 10) -------------------------------------------------------------------
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_event_splitter_cuts_any_split_of_any_line_ending_into_the_same_events(eol):
    from workbench.gateway.sse import EventSplitter

    events = [_chunk("a"), b": keep-alive\n\n", b"event: x\nid: 7\n" + _chunk("b"), _chunk("c", "stop")]
    lf = b"".join(events)
    data = lf.replace(b"\n", eol)
    rng = random.Random(2)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 30)))
        sp = EventSplitter()
        out = b"".join(sp.feed(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)])) + sp.rest()
        assert out == lf


def test_relay_reads_an_event_with_fields_before_its_data(words):
    relay = StreamRelay("chat", words, block=False, strip_usage=False, collect=False)
    out = relay.process(b"event: message\nid: 1\n" + _chunk("a badword") + _chunk(None, "stop"))
    assert b"badword" not in out and b"a ***" in out and out.startswith(b"event: message\nid: 1\ndata: ")


def test_characters_folded_at_c_speed_are_those_that_fold_to_themselves():
    import re

    from workbench.gateway.normalize import _stable_class, fold, fold_char

    stable = re.compile(f"[{_stable_class()}]")
    chars = [chr(o) for o in range(0x10000) if stable.match(chr(o))]
    assert len(chars) > 20000 and all(fold_char(c) == c for c in chars)
    text = "這是ＡＢＣ，敏感詞！bad\u200bword"
    assert fold(text) == "".join(fold_char(c) for c in text) == "这是abc,敏感词!badword"


def test_printable_text_holds_no_whitespace_but_the_space():
    """normalize.odd_spaces answers printable text by ``"  " in text`` alone: that is only true
    if no whitespace character other than U+0020 is printable (checked for every code point)."""
    from workbench.gateway.normalize import odd_spaces

    spaces = [chr(o) for o in range(0x110000) if chr(o).isspace() and o != 0x20]
    assert len(spaces) > 20 and not any(c.isprintable() for c in spaces)
    assert all(odd_spaces(f"bad{c}word") for c in spaces)
    assert not odd_spaces("a plain sentence, 一句话") and odd_spaces("two  spaces")


def test_clean_ascii_agrees_with_spans_and_held_tail(words):
    """The per-event check (one lowercase copy) answers as the two general ones do."""
    rng = random.Random(31)
    pieces = ["bad", "word", "BADWORD", "forbid", "den phrase", " ", "  ", "\t", "\n", "\x00", "\x7f", "x",
              "pipe", " bomb", "make a", ".", "Tok "]
    texts = ["", "tok ", "b", "bad", "badwor", "fine.", *words.words]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) for _ in range(3000)]
    for t in (t for t in texts if t.isascii()):
        assert words.clean_ascii(t) == (not words.spans(t) and not words.held_tail(t)), repr(t)
