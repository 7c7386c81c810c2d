"""workbench/sse.py, the one SSE parser, and its users: the load generator against CRLF, CR and LF
framed streams (the fake server and a real sse-starlette server), the gateway's splitter."""

import asyncio
import json
import random
import threading

import pytest

from workbench.loadgen.client import Target, make_session, run_async, run_step
from workbench.loadgen.workloads import RequestSpec
from workbench.net import free_port, wait_until
from workbench.sse import DONE, EventSplitter, event_data, iter_data
from workbench.testing.fakeserver import FakeServer


def test_multi_line_data_joins_with_lf_and_one_leading_space_is_dropped():
    assert event_data(b"data: a\ndata:  b\ndata:c\n\n") == b"a\n b\nc"


def test_comments_and_data_less_events_carry_no_data():
    assert event_data(b": keep-alive\n\n") is None
    assert event_data(b"event: ping\nid: 3\n\n") is None
    assert event_data(b"event: message\n: note\nid: 1\ndata: x\nretry: 5\n\n") == b"x"


def test_a_field_without_colon_is_a_name_with_an_empty_value():
    assert event_data(b"data\n\n") == b""  # the spec: the whole line is the field name
    assert event_data(b"datax: y\n\n") is None  # not the field "data"


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_whole_body_gives_the_same_values_at_any_line_end(eol):
    body = "data: {\"a\": 1}\n\n: ping\n\ndata: two\ndata: lines\n\ndata: [DONE]\n\n".replace("\n", eol)
    assert list(iter_data(body)) == [b'{"a": 1}', b"two\nlines", DONE]


def test_last_event_without_blank_line_is_kept_and_bom_dropped():
    assert list(iter_data(b"\xef\xbb\xbfdata: 1\r\n\r\ndata: 2")) == [b"1", b"2"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_splitter_cuts_any_split_of_any_line_ending_into_the_same_events(eol):
    lf = b"data: a\n\n: keep-alive\n\nevent: x\nid: 7\ndata: b\n\ndata: [DONE]\n\n"
    data = lf.replace(b"\n", eol)
    rng = random.Random(2)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 20)))
        sp = EventSplitter()
        out = b"".join(sp.feed(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)])) + sp.rest()
        assert out == lf


def test_gateway_uses_the_one_splitter():
    from workbench.gateway import sse as gateway_sse

    assert gateway_sse.EventSplitter is EventSplitter


def _one_request(base_url: str, max_tokens: int = 3):
    async def go():
        async with make_session(30) as session:
            return await run_step(session, Target(base_url, "fake-model"),
                                  [RequestSpec("hello there", max_tokens, 2)], [0.0], "rate_x")

    [rec] = run_async(go())
    return rec


@pytest.mark.parametrize("eol", ["lf", "crlf", "cr"])
def test_load_generator_reads_the_fake_server_at_any_line_end(eol):
    # The old client split on b"\n\n" only: a CRLF stream was one event that never ended (0 of 1).
    with FakeServer(output_tokens=3, itl_ms=2, line_ending=eol) as fake:
        rec = _one_request(fake.base_url)
    assert rec.success, (rec.error, rec.error_detail)
    assert (rec.completion_tokens, rec.content_chunks, len(rec.chunk_s)) == (3, 3, 5)


class _StarletteSSE:
    """A real sse-starlette server (CRLF framing by default, as its ServerSentEvent writes it),
    with a keep-alive comment and a multi-line first event, under uvicorn in a thread."""

    def __enter__(self):
        import uvicorn
        from sse_starlette.sse import EventSourceResponse
        from starlette.applications import Starlette
        from starlette.routing import Route

        async def chat(request):
            async def events():
                yield {"comment": "keep-alive"}
                yield {"data": '{"choices": [{"index": 0,\n"delta": {"role": "assistant", "content": ""}}]}'}
                for word in ("Hi", " there"):
                    await asyncio.sleep(0.01)
                    yield {"data": json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]})}
                yield {"data": json.dumps({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}})}
                yield {"data": "[DONE]"}

            return EventSourceResponse(events())

        self.port = free_port()
        app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 20)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_load_generator_reads_a_real_crlf_server():
    import httpx

    with _StarletteSSE() as base_url:
        raw = httpx.post(base_url + "/chat/completions", json={}).content
        rec = _one_request(base_url)
    assert raw.count(b"\r\n\r\n") == 6 and b"\n\n" not in raw  # CRLF framing: 6 events
    assert rec.success, (rec.error, rec.error_detail)
    assert (rec.completion_tokens, rec.content_chunks, len(rec.chunk_s)) == (2, 2, 3)
