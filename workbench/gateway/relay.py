"""Replies: relaying what an upstream answered (an error, a JSON body, an SSE stream) to the
client, with output filtering, after-generation moderation, usage capture and gzip for streams.
A mixin of the gateway app (workbench/gateway/app.py), split out to keep each file readable."""

from __future__ import annotations

import asyncio
import os
import re
import time

import aiohttp

from workbench.gateway.sse import DONE, GzipStream, StreamRelay, dumps, error_event, loads
from workbench.gateway.upstream import GatewayError

_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_JSON = b"application/json"


class Ctx:
    """What one request leaves behind for metrics and the audit row."""

    __slots__ = ("t0", "ts", "path", "request_id", "key_id", "model", "status", "prompt_tokens",
                 "completion_tokens", "ttft_s", "stream", "moderation", "filter", "prompt",
                 "error", "started", "client_gone", "done")

    def __init__(self, path: str):
        self.t0, self.ts, self.path = time.perf_counter(), time.time(), path
        self.request_id = os.urandom(16).hex()  # as random as uuid4().hex, a quarter of its cost
        self.key_id = self.model = self.ttft_s = self.prompt = self.error = None
        self.prompt_tokens = self.completion_tokens = None
        self.status, self.stream, self.started, self.client_gone, self.done = 0, False, False, False, False
        self.moderation: list[str] = []
        self.filter: list[str] = []


async def respond(send, status: int, body: bytes, content_type: bytes = _JSON, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Replies:
    async def _relay_error(self, ctx: Ctx, name: str, resp: aiohttp.ClientResponse, send) -> None:
        """An upstream 4xx/5xx keeps its status; a body not in OpenAI's shape is wrapped in it."""
        body = await self.upstreams.read(name, resp)
        if resp.status >= 500:
            self.metrics.upstream_errors.labels(name, f"http_{resp.status}").inc()
        try:
            ok = isinstance(loads(body).get("error"), dict)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            body = GatewayError(resp.status, f"Upstream '{name}' answered {resp.status}: "
                                f"{body[:300].decode(errors='replace')}",
                                "upstream_error" if resp.status >= 500 else "invalid_request_error",
                                f"upstream_{resp.status}").body()
        ctx.status, ctx.error, ctx.started = resp.status, body[:300].decode(errors="replace"), True
        await respond(send, resp.status, body)

    async def _relay_body(self, ctx: Ctx, route: str, resp: aiohttp.ClientResponse, send) -> None:
        name = self.routes[ctx.model]
        body = await self.upstreams.read(name, resp)
        f, after = self.filter, self.policy and self.cfg.moderation.after
        if route != "embeddings" and ((f and f.size and self.cfg.filter.output) or after):
            body = await self._check_output(ctx, route, body)
        else:
            i = body.rfind(b'"usage"')
            if i >= 0:
                tail = body[i:i + 300]
                m1, m2 = _PROMPT_TOKENS.search(tail), _COMPLETION_TOKENS.search(tail)
                ctx.prompt_tokens = int(m1.group(1)) if m1 else None
                ctx.completion_tokens = int(m2.group(1)) if m2 else (0 if m1 else None)
        ctx.status, ctx.started = resp.status, True
        await respond(send, resp.status, body, resp.headers.get("Content-Type", "application/json").encode(),
                    ((b"x-request-id", ctx.request_id.encode()),))

    async def _check_output(self, ctx: Ctx, route: str, body: bytes) -> bytes:
        obj = loads(body)
        usage = obj.get("usage") or {}
        ctx.prompt_tokens, ctx.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        slots = []
        for ch in obj.get("choices") or ():
            holder, key = (ch.get("message"), "content") if route == "chat" else (ch, "text")
            if isinstance(holder, dict) and isinstance(holder.get(key), str):
                slots.append((holder, key))
        f = self.filter
        if f and f.size and self.cfg.filter.output:
            total = 0
            for holder, key in slots:
                holder[key], n = f.apply_mask(holder[key])
                total += n
            if total:
                action = self.cfg.filter.action
                ctx.filter.append(f"output:{action}:{total}")
                self.metrics.filter_hits.labels("output", action).inc(total)
                if action == "block":
                    raise GatewayError(403, "The completion contained blocked content.", code="content_filter")
                body = dumps(obj)
        if self.policy and self.cfg.moderation.after:
            text = "\n".join(h[k] for h, k in slots)
            v = await self._moderate(ctx, text, "output", raise_=False)
            if v.flagged:
                raise GatewayError(403, f"The completion was flagged by moderation ({v.category or v.error}).",
                                   code="content_moderation")
        return body

    async def _relay_stream(self, ctx: Ctx, route: str, resp: aiohttp.ClientResponse, send,
                            gzip: bool, strip_usage: bool) -> None:
        name = self.routes[ctx.model]
        after = bool(self.policy and self.cfg.moderation.after)
        relay = StreamRelay(route, self.filter if self.cfg.filter.output else None,
                            self.cfg.filter.action == "block", strip_usage, after)
        gz = GzipStream() if gzip else None
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no"), (b"x-request-id", ctx.request_id.encode())]
        if gz:
            headers += [(b"content-encoding", b"gzip"), (b"vary", b"accept-encoding")]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        ctx.status, ctx.started = resp.status, True
        buf, tail = b"", b""
        try:
            async for chunk in resp.content.iter_any():
                buf += chunk
                cut = buf.rfind(b"\n\n")
                if cut < 0:
                    continue
                out = relay.process(buf[:cut + 2])
                buf = buf[cut + 2:]
                if relay.blocked:
                    tail = out
                    break
                if out:
                    if ctx.ttft_s is None:
                        ctx.ttft_s = time.perf_counter() - ctx.t0
                    await send({"type": "http.response.body", "body": gz.chunk(out) if gz else out,
                                "more_body": True})
            else:
                if buf.strip():
                    tail = relay.process(buf + b"\n\n")
                if not relay.blocked:
                    tail += relay.finish()
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels(name, "timeout").inc()
            ctx.error = "upstream timed out mid-stream"
            tail += error_event(f"Upstream '{name}' timed out", "upstream_error", "upstream_timeout")
        except aiohttp.ClientError as err:
            self.metrics.upstream_errors.labels(name, "protocol").inc()
            ctx.error = f"upstream broke off the stream: {err}"
            tail += error_event(f"Upstream '{name}' broke off the stream", "upstream_error", "bad_gateway")
        if relay.blocked:
            ctx.filter.append(f"output:block:{relay.hits}")
            self.metrics.filter_hits.labels("output", "block").inc(relay.hits)
            ctx.error = "output blocked by the filter"
            tail += error_event("The completion contained blocked content.", "invalid_request_error",
                                "content_filter") + DONE
        else:
            if relay.hits:
                ctx.filter.append(f"output:mask:{relay.hits}")
                self.metrics.filter_hits.labels("output", "mask").inc(relay.hits)
            if after:
                v = await self._moderate(ctx, "".join(relay.texts), "output", raise_=False)
                if v.flagged:
                    ctx.error = "output flagged by moderation"
                    tail += error_event(f"The completion was flagged by moderation ({v.category or v.error}).",
                                        "invalid_request_error", "content_moderation")
            if relay.done:
                tail += DONE
        usage = relay.usage or {}
        ctx.prompt_tokens, ctx.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        ctx.done = True
        await send({"type": "http.response.body", "body": gz.end(tail) if gz else tail, "more_body": False})
