"""Gateway behaviour against fake upstreams (workbench.testing.fakeserver and scripted ones): keys, every
error code with OpenAI's error shape, rate limits, streaming, gzip, disconnects, filter, moderation.
The same calls against real vLLM servers are in test_gateway_integration.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import zlib

import httpx
import pytest
import uvicorn
from aiohttp import web

from gateway_helpers import (AUTH, KEY, METRICS_AUTH, ClosingUpstream, ScriptedUpstream, counted,
                             _ThreadServer, assert_openai_error, make_cfg, sse_events, stream_text)
from workbench.gateway.server import GatewayServer
from workbench.promscrape import parse, total
from workbench.testing.fakeserver import FakeServer

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def fake():
    with FakeServer(output_tokens=8) as f:
        yield f


@pytest.fixture
def gw(fake, tmp_path):
    with GatewayServer(make_cfg(tmp_path, {"fake-model": fake.base_url})) as g:
        yield g


def post(gw, path, body=None, headers=AUTH, **kw):
    return httpx.post(gw.base_url + path, json=body, headers=headers, timeout=30, **kw)


def metrics(gw):
    return parse(httpx.get(gw.root_url + "/metrics", headers=METRICS_AUTH).text)


def audit_rows(gw):
    # A request's row is queued just after its last byte is sent, so a client can read the whole
    # reply first: wait for the server's request tasks to end (they end with the row queued).
    deadline = time.monotonic() + 5
    while gw._server.server_state.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    gw.app.audit.close()  # drains the writer queue (the test is over with this gateway)
    conn = sqlite3.connect(gw.cfg.audit.path)
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]


# ---- keys ----------------------------------------------------------------------------------
def test_health_needs_no_key(gw):
    assert httpx.get(gw.root_url + "/health").status_code == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/nowhere"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings")])
def test_every_route_but_health_needs_a_key(gw, method, path):
    for headers in ({}, {"Authorization": "Bearer wb-not-a-key"}, {"Authorization": KEY}):
        r = httpx.request(method, gw.root_url + path, json=CHAT, headers=headers)
        assert_openai_error(r, 401, "invalid_api_key")


def test_key_is_stored_hashed_and_labels_the_audit_row(gw):
    assert KEY not in gw.cfg.model_dump_json()
    assert post(gw, "/chat/completions", CHAT).status_code == 200
    rows = audit_rows(gw)
    assert [(r["key_id"], r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == \
        [("test", 200, 2, 8)]
    assert rows[0]["prompt"].startswith("hmac-sha256:")  # audit.prompt: hash (the default)


# ---- error codes ---------------------------------------------------------------------------
def test_bad_json_is_400(gw):
    r = httpx.post(gw.base_url + "/chat/completions", content=b'{"model": ', headers=AUTH)
    assert_openai_error(r, 400, "invalid_json")


@pytest.mark.parametrize("body,param", [
    ({"model": "fake-model"}, None),  # messages missing
    ({"model": "fake-model", "messages": []}, "messages"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ([1, 2], None),
])
def test_schema_violation_is_400_naming_the_field(gw, body, param):
    err = assert_openai_error(post(gw, "/chat/completions", body), 400, "invalid_value")
    assert err["param"] == param


def test_unknown_model_is_404(gw):
    err = assert_openai_error(post(gw, "/chat/completions", {**CHAT, "model": "gpt-9"}), 404, "model_not_found")
    assert err["param"] == "model" and "gpt-9" in err["message"]
    assert "fake-model" not in err["message"]  # the routed models are not listed to any caller


def test_body_over_the_limit_is_413(fake, tmp_path):
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, limits={"max_body_bytes": 1000})
    with GatewayServer(cfg) as gw:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        assert_openai_error(post(gw, "/chat/completions", big), 413, "body_too_large")

        def chunked():  # no Content-Length: the limit holds while reading
            yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'
        r = httpx.post(gw.base_url + "/chat/completions", content=chunked(), headers=AUTH)
        assert_openai_error(r, 413, "body_too_large")
        assert post(gw, "/chat/completions", CHAT).status_code == 200


def test_headers_over_the_limit_are_413(fake, tmp_path):
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, limits={"max_header_bytes": 1024})
    with GatewayServer(cfg) as gw:
        r = post(gw, "/chat/completions", CHAT, headers={**AUTH, "X-Padding": "p" * 2000})
        assert_openai_error(r, 413, "headers_too_large")


def test_request_rate_limit_is_429_with_retry_after(fake, tmp_path):
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, key={"requests_per_minute": 2})
    with GatewayServer(cfg) as gw:
        assert [post(gw, "/chat/completions", CHAT).status_code for _ in range(2)] == [200, 200]
        r = post(gw, "/chat/completions", CHAT)
        assert_openai_error(r, 429, "rate_limit_exceeded")
        assert 20 <= int(r.headers["retry-after"]) <= 30  # one request refills in 30 s
        assert total(metrics(gw), "workbench_gateway_rate_limited_total", limit="requests") >= 1


def test_token_limit_reserves_max_tokens_and_settles_to_usage(fake, tmp_path):
    # Each reply uses 2 prompt + 8 completion tokens (usage from the fake). A request reserves its
    # prompt (2, counted) + max_tokens (12) = 14 and is charged 10 at the end: 25 tokens per
    # minute admit two (the second streamed, usage from the stream), leave 5 and refuse a third.
    cfg = counted(make_cfg(tmp_path, {"fake-model": fake.base_url}, key={"tokens_per_minute": 25}))
    with GatewayServer(cfg) as gw:
        body = {**CHAT, "max_tokens": 12}
        assert post(gw, "/chat/completions", body).status_code == 200
        assert post(gw, "/chat/completions", {**body, "stream": True}).status_code == 200
        r = post(gw, "/chat/completions", body)
        assert_openai_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        assert 5 <= gw.app.keys.lookup(f"Bearer {KEY}".encode()).tokens.level < 7  # + refill, 0.4/s


def test_upstream_down_is_503_after_one_retry(tmp_path):
    with FakeServer() as stopped:
        url = stopped.base_url
    with GatewayServer(make_cfg(tmp_path, {"fake-model": url})) as gw:
        err = assert_openai_error(post(gw, "/chat/completions", CHAT), 503, "upstream_unavailable")
        assert url.split("/")[2] not in err["message"] and "127.0.0.1" not in err["message"]  # no address
        assert total(metrics(gw), "workbench_gateway_upstream_errors_total", kind="connect") == 2


def test_upstream_error_status_passes_through_in_openai_shape(tmp_path):
    with FakeServer(fail_every=1) as failing, GatewayServer(
            make_cfg(tmp_path, {"fake-model": failing.base_url})) as gw:
        assert_openai_error(post(gw, "/chat/completions", CHAT), 503, "upstream_503")


class HtmlErrorUpstream(_ThreadServer):
    """A proxy in front of the model server that answers 500 with an HTML page naming itself."""

    PAGE = "<html><body><h1>500</h1>nginx/1.25 at 10.0.0.7:8000 internal trace</body></html>"

    def _serve(self):
        self.loop = asyncio.new_event_loop()
        async def page(_):
            return web.Response(status=500, text=self.PAGE, content_type="text/html")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", page)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()


def test_upstream_html_error_page_is_not_echoed_but_audited(tmp_path):
    with HtmlErrorUpstream() as up, GatewayServer(make_cfg(tmp_path, {"fake-model": up.base_url})) as gw:
        r = post(gw, "/chat/completions", CHAT)
        err = assert_openai_error(r, 500, "upstream_500")
        assert "nginx" not in err["message"] and "10.0.0.7" not in err["message"]
        assert "10.0.0.7" in audit_rows(gw)[0]["error"]  # the details stay with the operator


def test_upstream_closing_the_connection_is_502(tmp_path):
    with ClosingUpstream() as up, GatewayServer(make_cfg(tmp_path, {"fake-model": up.base_url})) as gw:
        assert_openai_error(post(gw, "/chat/completions", CHAT), 502, "upstream_disconnected")
        assert up.accepted == 2  # tried twice


def test_upstream_timeout_is_504_and_an_event_mid_stream(tmp_path):
    with FakeServer(ttft_ms=3000, output_tokens=4) as slow, GatewayServer(make_cfg(
            tmp_path, {"fake-model": slow.base_url}, limits={"read_timeout_s": 0.3})) as gw:
        t0 = time.perf_counter()
        assert_openai_error(post(gw, "/chat/completions", CHAT), 504, "upstream_timeout")
        # 0.3 s (a retry: 0.6 s); a gateway that waited for the upstream takes its 3 s. The margin
        # is for a loaded 2-core host.
        assert time.perf_counter() - t0 < 2.5
    with FakeServer(itl_ms=800, output_tokens=4) as stalls, GatewayServer(make_cfg(
            tmp_path, {"fake-model": stalls.base_url}, limits={"read_timeout_s": 0.3})) as gw:
        events = sse_events(post(gw, "/chat/completions", {**CHAT, "stream": True}).text)
        assert events[-1]["error"]["code"] == "upstream_timeout"


# ---- models, metrics, openapi ----------------------------------------------------------------
def test_models_merges_every_upstream(tmp_path):
    with FakeServer(model="model-a") as a, FakeServer(model="model-b") as b, GatewayServer(
            make_cfg(tmp_path, {"model-a": a.base_url, "model-b": b.base_url})) as gw:
        r = httpx.get(gw.base_url + "/models", headers=AUTH)
        assert sorted(m["id"] for m in r.json()["data"]) == ["model-a", "model-b"]


def test_metrics_take_the_metrics_key_and_refuse_tenant_keys(gw):
    assert httpx.get(gw.root_url + "/metrics", headers=METRICS_AUTH).status_code == 200
    err = assert_openai_error(httpx.get(gw.root_url + "/metrics", headers=AUTH), 403, "wrong_key_role")
    assert "/metrics" in err["message"]
    # and the metrics key is no client key
    assert_openai_error(post(gw, "/chat/completions", CHAT, headers=METRICS_AUTH), 403, "wrong_key_role")
    assert_openai_error(httpx.get(gw.base_url + "/models", headers=METRICS_AUTH), 403, "wrong_key_role")


def test_models_listing_is_rate_limited(fake, tmp_path):
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, key={"requests_per_minute": 2})
    with GatewayServer(cfg) as gw:
        rs = [httpx.get(gw.base_url + "/models", headers=AUTH) for _ in range(3)]
        assert [r.status_code for r in rs[:2]] == [200, 200]
        assert_openai_error(rs[2], 429, "rate_limit_exceeded")


def test_error_replies_carry_a_request_id_and_401_asks_for_a_bearer_token(gw):
    r = httpx.get(gw.base_url + "/models")
    assert_openai_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == 'Bearer realm="gateway"'
    r = httpx.get(gw.base_url + "/models", headers={"Authorization": "Bearer wb-wrong"})
    assert r.headers["www-authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    ids = []
    for r in (post(gw, "/chat/completions", {**CHAT, "model": "nope"}), post(gw, "/chat/completions", [1]),
              httpx.get(gw.root_url + "/nowhere", headers=AUTH), r):
        assert r.status_code >= 400 and len(r.headers["x-request-id"]) == 32, r.headers
        ids.append(r.headers["x-request-id"])
    assert set(ids) <= {row["request_id"] for row in audit_rows(gw)}  # the id finds the audit row


def test_metrics_count_requests_tokens_and_latency(gw):
    post(gw, "/chat/completions", CHAT)
    post(gw, "/chat/completions", {**CHAT, "stream": True})
    post(gw, "/chat/completions", {**CHAT, "model": "nope"})
    m = metrics(gw)
    assert total(m, "workbench_gateway_requests_total", route="/v1/chat/completions", status="200") == 2
    assert total(m, "workbench_gateway_requests_total", status="404", model="") == 1
    assert total(m, "workbench_gateway_tokens_total", kind="completion") == 16
    assert total(m, "workbench_gateway_time_to_first_token_seconds_count") == 1
    assert total(m, "workbench_gateway_request_duration_seconds_count", model="fake-model") == 2


def test_latency_series_of_every_route_and_model_are_exported_at_zero_before_the_first_request(gw):
    """So that rate() over them starts from zero (a series born with its first request skews a
    recorded quantile toward the next bucket up)."""
    m = metrics(gw)
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert total(m, "workbench_gateway_request_duration_seconds_count", route=route, model="fake-model") == 0
        assert total(m, "workbench_gateway_request_duration_seconds_bucket", route=route, model="fake-model",
                     le="+Inf") == 0
    assert total(m, "workbench_gateway_time_to_first_token_seconds_count", route="/v1/chat/completions",
                 model="fake-model") == 0
    assert not [s for s in m if s.name == "workbench_gateway_time_to_first_token_seconds_count"
                and dict(s.labels).get("route") == "/v1/embeddings"]  # no first token there
    doc = httpx.get(gw.root_url + "/openapi.json", headers=AUTH).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"} <= set(doc["paths"])
    schema = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["model"]["enum"] == ["fake-model"]


# ---- streaming -------------------------------------------------------------------------------
def test_stream_relays_events_and_hides_the_usage_it_asked_for(fake, gw):
    direct = sse_events(httpx.post(fake.base_url + "/chat/completions", json={**CHAT, "stream": True}).text)
    via = sse_events(post(gw, "/chat/completions", {**CHAT, "stream": True}).text)
    assert stream_text(via) == stream_text(direct) == "tok " * 8
    assert via[-1] == "[DONE]" and not any(isinstance(e, dict) and "usage" in e for e in via)
    with_usage = sse_events(post(gw, "/chat/completions", {
        **CHAT, "stream": True, "stream_options": {"include_usage": True}}).text)
    assert with_usage[-2]["usage"]["completion_tokens"] == 8


def test_gzip_stream_decodes_to_the_same_events_and_arrives_incrementally(tmp_path):
    with FakeServer(itl_ms=60, output_tokens=10) as slow, GatewayServer(
            make_cfg(tmp_path, {"fake-model": slow.base_url})) as gw:
        plain = sse_events(post(gw, "/chat/completions", {**CHAT, "stream": True}).text)
        d = zlib.decompressobj(31)
        decoded, arrivals = b"", []
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", gw.base_url + "/chat/completions", json={**CHAT, "stream": True},
                               headers={**AUTH, "Accept-Encoding": "gzip"}) as r:
                assert r.headers["content-encoding"] == "gzip"
                for raw in r.iter_raw():  # compressed bytes as they arrive
                    part = d.decompress(raw)
                    decoded += part
                    if part.count(b"\n\n"):
                        arrivals.append((time.perf_counter(), part.count(b"\n\n")))
        assert d.eof  # a complete gzip member
        assert sse_events(decoded.decode()) == plain
        # events decode as they arrive, not all at the end: ~60 ms apart over ~0.5 s
        assert len(arrivals) >= 8
        assert arrivals[-1][0] - arrivals[0][0] > 0.3


@pytest.mark.parametrize("value,want", [
    (b"gzip", True), (b"br, GZIP ;Q=1", True), (b"identity, gzip;q=0.5", True), (b"x-gzip", True),
    (b"gzip;q=0", False), (b"gzip; q=0.000, identity", False), (b"gzip;q=nope", False),
    (b"gzipped", False), (b"identity", False), (b"", False)])
def test_accept_encoding_q_values_decide_gzip(value, want):
    from workbench.gateway.intake import accepts_gzip

    assert accepts_gzip(value) is want


def test_gzip_q0_stream_is_not_compressed(gw):
    r = post(gw, "/chat/completions", {**CHAT, "stream": True}, headers={**AUTH, "Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in r.headers and stream_text(sse_events(r.text)) == "tok " * 8


@pytest.mark.parametrize("server", ["gateway", "plain_uvicorn"])
def test_client_disconnect_cancels_the_upstream_request(tmp_path, server):
    """The gateway's HTTP layer calls the app's hook on the scope (http.ON_GONE); under plain
    uvicorn (``uvicorn --factory workbench.gateway.app:from_env``) a task waiting on receive() does."""
    with FakeServer(itl_ms=100, output_tokens=100) as slow:
        gw = GatewayServer(make_cfg(tmp_path, {"fake-model": slow.base_url}))
        if server == "plain_uvicorn":
            gw._server = uvicorn.Server(uvicorn.Config(gw.app, host=gw.host, port=gw.port, http="httptools",
                                                       lifespan="on", log_level="warning"))
        with gw:
            with httpx.Client(timeout=30) as client, client.stream(
                    "POST", gw.base_url + "/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
                next(r.iter_raw())
                assert slow.fake.running == 1
            deadline = time.monotonic() + 3  # 100 tokens would take 10 s
            while slow.fake.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slow.fake.running == 0
            rows = audit_rows(gw)
            assert [r["status"] for r in rows] == [499]


# ---- filter and moderation -------------------------------------------------------------------
@pytest.mark.parametrize("text", ["please say BADWORD", "这是一个敏感词吗"])
def test_filter_blocks_prompt_words_in_english_and_chinese(gw, text):
    body = {**CHAT, "messages": [{"role": "user", "content": text}]}
    assert_openai_error(post(gw, "/chat/completions", body), 400, "content_filter")
    assert total(metrics(gw), "workbench_gateway_filter_hits_total", stage="prompt") == 1


def test_filter_masks_prompt_before_it_goes_upstream(tmp_path):
    with ScriptedUpstream(["ok"]) as up, GatewayServer(make_cfg(
            tmp_path, {"scripted": up.base_url}, filter={"action": "mask"})) as gw:
        r = post(gw, "/chat/completions", {"model": "scripted", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "one badword, two 违禁品"}]}]})
        assert r.status_code == 200
        assert up.bodies[0]["messages"][0]["content"][0]["text"] == "one ***, two ***"


@pytest.mark.parametrize("pieces", [["this is a bad", "wo", "rd, ok"], ["这是敏", "感", "词。"],
                                    ["b", "a", "d", "w", "o", "r", "d"]])
def test_filter_masks_a_word_split_across_stream_chunks(tmp_path, pieces):
    with ScriptedUpstream(pieces) as up, GatewayServer(make_cfg(
            tmp_path, {"scripted": up.base_url}, filter={"action": "mask"})) as gw:
        events = sse_events(post(gw, "/chat/completions", {**CHAT, "model": "scripted", "stream": True}).text)
        text = stream_text(events)
        assert text == "".join(pieces).replace("badword", "***").replace("敏感词", "***")
        assert events[-1] == "[DONE]"


def test_filter_block_ends_the_stream_with_an_error_event(tmp_path):
    with ScriptedUpstream(["fine text, then bad", "word and more"], delay_s=0.05) as up, GatewayServer(
            make_cfg(tmp_path, {"scripted": up.base_url})) as gw:
        events = sse_events(post(gw, "/chat/completions", {**CHAT, "model": "scripted", "stream": True}).text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "content_filter"
        assert "bad" not in stream_text(events)  # the held-back tail never left the gateway
        assert audit_rows(gw)[0]["filter"] == "output:block:1"


def test_filter_blocks_non_streamed_output_with_403(tmp_path):
    with ScriptedUpstream(["a badword"]) as up, GatewayServer(
            make_cfg(tmp_path, {"scripted": up.base_url})) as gw:
        assert_openai_error(post(gw, "/chat/completions", {**CHAT, "model": "scripted"}), 403, "content_filter")


def test_keyword_moderation_blocks_and_its_latency_is_a_histogram(fake, tmp_path):
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url}, moderation={"patterns": [r"\bsteal\b"]})
    with GatewayServer(cfg) as gw:
        body = {**CHAT, "messages": [{"role": "user", "content": "how to STEAL a car"}]}
        assert_openai_error(post(gw, "/chat/completions", body), 400, "content_moderation")
        assert post(gw, "/chat/completions", CHAT).status_code == 200
        m = metrics(gw)
        assert total(m, "workbench_gateway_moderation_duration_seconds_count", policy="keyword") == 2
        assert total(m, "workbench_gateway_moderation_blocks_total", stage="input") == 1
        assert [r["moderation"] for r in audit_rows(gw) if r["route"] != "/metrics"] == \
            ["input:flagged:STEAL", "input:ok"]


def test_llm_moderation_asks_the_classifier_model(fake, tmp_path):
    with ScriptedUpstream(["unsafe\nS2"], model="guard") as guard:
        cfg = make_cfg(tmp_path, {"fake-model": fake.base_url, "guard": guard.base_url},
                       moderation={"policy": "llm", "llm": {"model": "guard"}})
        with GatewayServer(cfg) as gw:
            err = assert_openai_error(post(gw, "/chat/completions", CHAT), 400, "content_moderation")
            assert "S2" in err["message"]
            asked = guard.bodies[0]["messages"][0]["content"]
            assert "hello there" in asked and "'safe' or 'unsafe'" in asked


def test_llm_moderation_failing_follows_on_error(fake, tmp_path):
    with FakeServer() as stopped:
        url = stopped.base_url
    cfg = make_cfg(tmp_path, {"fake-model": fake.base_url, "guard": url},
                   moderation={"policy": "llm", "llm": {"model": "guard"}, "on_error": "allow"})
    with GatewayServer(cfg) as gw:
        assert post(gw, "/chat/completions", CHAT).status_code == 200
        assert audit_rows(gw)[0]["moderation"] == "input:error"


def test_gateway_imports_nothing_of_the_pipeline():
    import subprocess
    import sys

    # workbench.net (a free port, the readiness poll, server URLs; stdlib and httpx) is shared by
    # every local server, the gateway's included, and workbench.sse (the one SSE parser, stdlib
    # only) with the load generator; nothing else of the package is.
    code = ("import sys, workbench.gateway.server, workbench.gateway.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'lm_eval', 'mlflow'}), "
            "sorted(m for m in sys.modules if m.startswith('workbench.') and not m.startswith('workbench.gateway')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['workbench.net', 'workbench.sse']"
