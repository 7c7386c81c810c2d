"""The fake OpenAI-compatible server's aiohttp app (``Fake``), its options (``FakeOptions``) and the
SSE bytes it sends; workbench/testing/fakeserver.py runs it in a thread, a subprocess or from the
command line, and its docstring describes what it serves."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass

from aiohttp import web

try:
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    import json

    _loads = json.loads

    def _dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

TOKEN = "tok "
EOLS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}  # SSE line ends (FakeOptions.line_ending)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, float("inf"))


@dataclass(frozen=True)
class FakeOptions:
    ttft_ms: float = 0.0  # request received -> role chunk + first token
    itl_ms: float = 0.0  # between later tokens
    output_tokens: int = 32  # reply length unless max_tokens is smaller
    model: str = "fake-model"
    fail_every: int = 0  # every Nth request gets 503 (0: never)
    # Generations served at once (0: unlimited); the rest wait in a FIFO queue, and the wait shows
    # as TTFT: a server with a capacity of max_running / service time, so a load test sees a knee.
    max_running: int = 0
    embedding_dim: int = 8
    # Non-streamed chat replies, in turn (the i-th reply is answers[i % len]), instead of "tok tok ...":
    # a stand-in for a model answering multiple-choice questions ("B", "The answer is C.", "Paris").
    answers: tuple[str, ...] = ()
    api_key: str | None = None  # when set, a request without "Authorization: Bearer <key>" gets 401
    # SSE line end: "lf" as vLLM; "crlf" as sse-starlette's default; "cr" (legal, rare). The JSON
    # in an event holds no raw LF, so the framing is changed by one replace on the ready bytes.
    line_ending: str = "lf"


def _sse(obj: dict) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


@functools.lru_cache(maxsize=256)
def _stream_parts(kind: str, model: str, n: int) -> tuple[bytes, bytes, bytes]:
    """(first: role chunk + first token, each later token, finish chunk) for an n-token reply."""
    base = {"id": "cmpl-fake", "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": 0, "model": model}
    if kind == "chat":
        role = _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
        tok = _sse({**base, "choices": [{"index": 0, "delta": {"content": TOKEN},
                                         "logprobs": None, "finish_reason": None}]})
        fin = _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                         "finish_reason": "length"}]})
        return role + tok, tok, fin
    tok = _sse({**base, "choices": [{"index": 0, "text": TOKEN, "logprobs": None,
                                     "finish_reason": None}]})
    fin = _sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                     "finish_reason": "length"}]})
    return tok, tok, fin


def _usage(prompt_tokens: int, n: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


class Fake:
    def __init__(self, opts: FakeOptions):
        self.opts = opts
        self.requests = 0
        self.running = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.waiting = 0
        self.prefix_queries = 0  # prompt tokens looked up, as vllm:prefix_cache_queries counts them
        self.prefix_hits = 0
        self._seen: set[tuple[str | None, str]] = set()
        self._slots: asyncio.Semaphore | None = None
        self.answered = 0  # chat replies taken from opts.answers

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", functools.partial(self.generate, "chat"))
        app.router.add_post("/v1/completions", functools.partial(self.generate, "completions"))
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.opts.model, "object": "model", "owned_by": "workbench-fake"}]})

    def _observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        for i, le in enumerate(TTFT_BUCKETS):
            if seconds <= le:
                self.ttft_counts[i] += 1
                break

    async def metrics(self, request: web.Request) -> web.Response:
        m = f'model_name="{self.opts.model}"'
        lines = ["# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{{{m}}} {self.running}",
                 "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting{{{m}}} {self.waiting}",
                 "# TYPE vllm:num_preemptions counter", f"vllm:num_preemptions_total{{{m}}} 0",
                 "# TYPE vllm:prefix_cache_queries counter",
                 f"vllm:prefix_cache_queries_total{{{m}}} {self.prefix_queries}",
                 "# TYPE vllm:prefix_cache_hits counter", f"vllm:prefix_cache_hits_total{{{m}}} {self.prefix_hits}",
                 "# TYPE vllm:kv_cache_usage_perc gauge",
                 f"vllm:kv_cache_usage_perc{{{m}}} {min(1.0, self.running / 100):.4f}",
                 "# TYPE vllm:request_success counter", f"vllm:request_success_total{{{m}}} {self.requests}",
                 "# TYPE vllm:time_to_first_token_seconds histogram"]
        cum = 0
        for le, c in zip(TTFT_BUCKETS, self.ttft_counts):
            cum += c
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{"+Inf" if le == float("inf") else le}",{m}}} {cum}')
        lines += [f"vllm:time_to_first_token_seconds_sum{{{m}}} {self.ttft_sum}",
                  f"vllm:time_to_first_token_seconds_count{{{m}}} {cum}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _failing(self) -> bool:
        self.requests += 1
        return bool(self.opts.fail_every) and self.requests % self.opts.fail_every == 0

    async def generate(self, kind: str, request: web.Request) -> web.StreamResponse:
        if self.opts.api_key and request.headers.get("Authorization") != f"Bearer {self.opts.api_key}":
            return web.Response(status=401, text='{"error":"bad key"}', content_type="application/json")
        if not self.opts.max_running:
            return await self._generate(kind, request, time.perf_counter())
        t0 = time.perf_counter()  # queueing counts towards TTFT, as in a real server
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.opts.max_running)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            return await self._generate(kind, request, t0)
        finally:
            self._slots.release()

    async def _generate(self, kind: str, request: web.Request, t0: float) -> web.StreamResponse:
        body = _loads(await request.read())
        if self._failing():
            return web.Response(status=503, text='{"error":"fake overload"}', content_type="application/json")
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 128 or set(salt) & set("@/\\\0")):
            return web.Response(status=400, content_type="application/json",  # vLLM's own check
                                text='{"error":"Parameter \'cache_salt\' must be at most 128 characters and '
                                     'must not contain \'@\', \'/\', \'\\\\\', or NUL."}')
        o = self.opts
        n = max(1, min(int(body.get("max_tokens") or body.get("max_completion_tokens") or o.output_tokens),
                       o.output_tokens))
        prompt = body.get("prompt") if kind == "completions" else " ".join(
            str(m.get("content", "")) for m in body.get("messages", ()))
        usage = _usage(max(1, len(str(prompt).split())), n)
        self.prefix_queries += usage["prompt_tokens"]
        key = (salt, str(prompt))  # vLLM: a salted prompt hits only its own salt's cache
        if key in self._seen:
            self.prefix_hits += usage["prompt_tokens"]
        elif len(self._seen) < 100_000:
            self._seen.add(key)
        self.running += 1
        try:
            if not body.get("stream"):
                if o.ttft_ms or o.itl_ms:
                    await asyncio.sleep((o.ttft_ms + o.itl_ms * (n - 1)) / 1000)
                text = TOKEN * n
                if kind == "chat" and o.answers:
                    text = o.answers[self.answered % len(o.answers)]
                    self.answered += 1
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": "length"} if kind == "chat" else
                          {"index": 0, "text": text, "finish_reason": "length"})
                self._observe_ttft(time.perf_counter() - t0)
                return web.Response(body=_dumps({"id": "cmpl-fake", "object": "chat.completion" if kind == "chat"
                                                 else "text_completion", "created": 0, "model": o.model,
                                                 "choices": [choice], "usage": usage}),
                                    content_type="application/json")
            first, tok, fin = _stream_parts(kind, o.model, n)
            eol = EOLS[o.line_ending]
            if eol != b"\n":
                first, tok, fin = (part.replace(b"\n", eol) for part in (first, tok, fin))
            tail = fin
            if (body.get("stream_options") or {}).get("include_usage"):
                tail += _sse({"id": "cmpl-fake", "created": 0,
                              "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                              "model": o.model, "choices": [], "usage": usage})
            tail += b"data: [DONE]\n\n"
            if eol != b"\n":
                tail = tail.replace(b"\n", eol)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            if not o.ttft_ms and not o.itl_ms:  # no delays: one write, the fastest a server can be
                self._observe_ttft(time.perf_counter() - t0)
                await resp.write(first + tok * (n - 1) + tail)
            else:
                if o.ttft_ms:
                    await asyncio.sleep(o.ttft_ms / 1000)
                self._observe_ttft(time.perf_counter() - t0)
                await resp.write(first)
                for _ in range(n - 1):
                    if o.itl_ms:
                        await asyncio.sleep(o.itl_ms / 1000)
                    await resp.write(tok)
                await resp.write(tail)
            await resp.write_eof()
            return resp
        finally:
            self.running -= 1

    async def embeddings(self, request: web.Request) -> web.Response:
        body = _loads(await request.read())
        if self._failing():
            return web.Response(status=503, text='{"error":"fake overload"}', content_type="application/json")
        if self.opts.ttft_ms:
            await asyncio.sleep(self.opts.ttft_ms / 1000)
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        n_tok = sum(len(str(i).split()) for i in inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.0] * self.opts.embedding_dim}
                for i in range(len(inputs))]
        return web.Response(body=_dumps({"object": "list", "data": data, "model": self.opts.model,
                                         "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}),
                            content_type="application/json")
