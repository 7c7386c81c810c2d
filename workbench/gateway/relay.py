"""Replies: relaying what an upstream answered (an error, a JSON body, an SSE stream) to the
client, with output filtering, after-generation moderation, usage capture and gzip for streams.
A mixin of the gateway app (workbench/gateway/app.py), split out to keep each file readable.

Token accounting: a key with a token limit reserves prompt + max_tokens at admission (app.py);
``settle`` replaces the reservation with what the request used when it ends, however it ends:
the upstream's usage, or for a stream the client dropped (499), the text events relayed until
then plus the prompt estimate. Usage values are checked (a count is an int in [0, 2**31)); a
bad one is recorded as unknown and never raises after the reply has started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from random import getrandbits
from urllib.parse import urlsplit

import aiohttp

from workbench.gateway.sse import (DONE, EventSplitter, GzipStream, StreamRelay, dumps, error_event, loads,
                                   message_slots)
from workbench.gateway.client import ClientError
from workbench.gateway.http import CHUNKS
from workbench.gateway.logprobs import filter_choice_logprobs
from workbench.gateway.pump import push_stream
from workbench.gateway.upstream import GatewayError, UpstreamBroke

log = logging.getLogger(__name__)
_JSON = b"application/json"
_MAX_COUNT = 2 ** 31


class Ctx:
    """What one request leaves behind for metrics and the audit row."""

    __slots__ = ("t0", "ts", "path", "request_id", "key_id", "model", "status", "prompt_tokens",
                 "completion_tokens", "ttft_s", "stream", "moderation", "filter", "prompt",
                 "error", "started", "client_gone", "done", "client", "charged", "reserved",
                 "prompt_estimate", "upstream_called", "relay", "output_estimate", "upstream_broke")

    def __init__(self, path: str):
        self.t0, self.ts, self.path = time.perf_counter(), time.time(), path
        # 128 random bits as 32 hex digits, like uuid4().hex; from Python's generator (reseeded in
        # a forked worker), not os.urandom (a getrandom() syscall: 0.48 us against 0.34 on an idle
        # core, and more on a busy VM)
        self.request_id = f"{getrandbits(128):032x}"
        self.key_id = self.model = self.ttft_s = self.prompt = self.error = None
        self.prompt_tokens = self.completion_tokens = None
        self.status, self.stream, self.started, self.client_gone, self.done = 0, False, False, False, False
        self.moderation: list[str] = []
        self.filter: list[str] = []
        self.client = self.charged = self.relay = None
        self.reserved, self.prompt_estimate, self.output_estimate, self.upstream_called = 0, 0, 0, False
        self.upstream_broke = False


def settle(ctx: Ctx) -> float:
    """What to charge the key's token bucket (negative: give back) so that it holds what the
    request used instead of what it reserved (the app's limits store applies it)."""
    if ctx.prompt_tokens is not None or ctx.completion_tokens is not None:
        prompt = ctx.prompt_tokens if ctx.prompt_tokens is not None else ctx.prompt_estimate
        used = prompt + (ctx.completion_tokens or 0)
    elif ctx.started and ctx.status == 200:  # a reply without usage: estimated from its size
        used = min(ctx.reserved, ctx.prompt_estimate + ctx.output_estimate)
    else:
        used = ctx.prompt_estimate if ctx.upstream_called and ctx.status in (499, 504) else 0
    return used - ctx.reserved


def stream_tokens(ctx: Ctx) -> None:
    """A stream's tokens, however it ended: its usage chunk, else the text events relayed."""
    relay = ctx.relay
    ctx.prompt_tokens = count(ctx, relay.usage, "prompt_tokens")
    completion = count(ctx, relay.usage, "completion_tokens")
    ctx.completion_tokens = relay.streamed if completion is None else completion


def count(ctx: Ctx, usage, field: str) -> int | None:
    """A token count from an upstream's usage, or None (logged, noted in the audit row's error)."""
    v = usage.get(field) if isinstance(usage, dict) else None
    if v is None or type(v) is int and 0 <= v < _MAX_COUNT:
        return v
    note = f"upstream usage.{field} is not a token count: {str(v)[:40]!r}"
    log.warning("%s (request %s)", note, ctx.request_id)
    ctx.error = ctx.error or note
    return None


def _filter_logprobs(f, choices, chat: bool) -> bool:
    """Filter every choice's logprobs against its original texts (logprobs.py); True if any."""
    found = False
    for ch in choices if isinstance(choices, list) else ():
        lp = ch.get("logprobs") if isinstance(ch, dict) else None
        if not isinstance(lp, dict):
            continue
        holder = ch.get("message") if chat else ch
        if not isinstance(holder, dict):
            continue
        keys = ("content", "refusal") if chat else ("text",)
        fields = {k: holder[k] for k in keys if isinstance(holder.get(k), str)}
        ch["logprobs"] = filter_choice_logprobs(f, lp, fields, chat)
        found = True
    return found


def media_url_allowed(url, hosts: list[str]) -> bool:
    """http(s) URLs of a listed host ("*.example.com": its subdomains), and inline data: URLs."""
    if not isinstance(url, str):
        return False
    if url[:5].lower() == "data:":
        return True
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    if parts.scheme.lower() not in ("http", "https") or "@" in parts.netloc or "\\" in url or not host:
        return False
    return any(host == h.lower() or (h.startswith("*.") and host.endswith(h[1:].lower())) for h in hosts)


async def respond(send, status: int, body: bytes, content_type: bytes = _JSON, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Replies:
    async def _relay_error(self, ctx: Ctx, name: str, resp, send) -> None:
        """An upstream 4xx/5xx keeps its status; a body not in OpenAI's shape is wrapped in it."""
        body = await self.upstreams.read(name, resp)
        if resp.status >= 500:
            self.metrics.upstream_errors.labels(name, f"http_{resp.status}").inc()
        try:
            ok = isinstance(loads(body).get("error"), dict)
        except (ValueError, AttributeError):
            ok = False
        ctx.status, ctx.error, ctx.started = resp.status, body[:300].decode(errors="replace"), True
        if not ok:  # e.g. a proxy's HTML page: its text goes to the log and the audit row, not the client
            log.warning("upstream %s answered %d with a non-OpenAI body: %r", name, resp.status, body[:300])
            body = GatewayError(resp.status, f"The model server answered {resp.status}.",
                                "upstream_error" if resp.status >= 500 else "invalid_request_error",
                                f"upstream_{resp.status}").body()
        await respond(send, resp.status, body, headers=((b"x-request-id", ctx.request_id.encode()),))

    async def _relay_body(self, ctx: Ctx, route: str, resp, send) -> None:
        name = self.routes[ctx.model]
        body = await self.upstreams.read(name, resp)
        try:
            obj = loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):  # never a 500, nor a 200 the client cannot parse
            self.metrics.upstream_errors.labels(name, "bad_reply").inc()
            log.warning("upstream %s answered %d with a body that is not a JSON object: %r",
                        name, resp.status, body[:200])
            raise UpstreamBroke(502, "The upstream's reply could not be read.", "upstream_error", "bad_gateway")
        usage = obj.get("usage")
        ctx.prompt_tokens = count(ctx, usage, "prompt_tokens")
        ctx.completion_tokens = count(ctx, usage, "completion_tokens")
        if ctx.prompt_tokens is not None and ctx.completion_tokens is None:
            ctx.completion_tokens = 0  # embeddings
        ctx.output_estimate = len(body) // 4  # for settle() when usage is missing (~4 bytes a token)
        f, after = self.filter, self.policy and self.cfg.moderation.after
        if route != "embeddings" and ((f and f.size and self.cfg.filter.output) or after):
            body = await self._check_output(ctx, route, obj, body)
        ctx.status, ctx.started = resp.status, True
        await respond(send, resp.status, body, resp.headers.get("content-type", "application/json").encode(),
                      ((b"x-request-id", ctx.request_id.encode()),))

    async def _check_output(self, ctx: Ctx, route: str, obj: dict, body: bytes) -> bytes:
        """Filter every text field of every choice (content, reasoning, refusal, tool-call
        arguments; a completion's text), then after-generation moderation over all of it."""
        slots = []
        choices = obj.get("choices")
        for ch in choices if isinstance(choices, list) else ():
            if not isinstance(ch, dict):
                continue
            if route == "chat":
                msg = ch.get("message")
                slots += [(c, k) for c, k, _ in message_slots(msg)] if isinstance(msg, dict) else []
            elif isinstance(ch.get("text"), str):
                slots.append((ch, "text"))
        f = self.filter
        if f and f.size and self.cfg.filter.output:
            relogged = _filter_logprobs(f, choices, route == "chat")  # before the texts are masked
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
            if total or relogged:
                body = dumps(obj)
        if self.policy and self.cfg.moderation.after:
            text = "\n".join(h[k] for h, k in slots)
            v = await self._moderate(ctx, text, "output", raise_=False)
            if v.flagged:
                raise GatewayError(403, f"The completion was flagged by moderation ({v.category or v.error}).",
                                   code="content_moderation")
        return body

    async def _relay_stream(self, ctx: Ctx, route: str, resp, send,
                            gzip: bool, strip_usage: bool, scope=None) -> None:
        name = self.routes[ctx.model]
        after = bool(self.policy and self.cfg.moderation.after)
        relay = StreamRelay(route, self.filter if self.cfg.filter.output else None,
                            self.cfg.filter.action == "block", strip_usage, after)
        gz = GzipStream() if gzip else None
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no"), (b"x-request-id", ctx.request_id.encode())]
        if gz:
            headers += [(b"content-encoding", b"gzip"), (b"vary", b"accept-encoding")]
        # The head goes with the first event, so a stream that breaks before it can be retried
        # on another replica (app.py) with nothing sent to the client yet.
        start = {"type": "http.response.start", "status": resp.status, "headers": headers}
        frames, tail = EventSplitter(), b""
        ctx.relay = relay  # its token count outlives a cancelled stream (stream_tokens)
        keys_seen = self.keys.version  # a reload (revoke-key) is checked between events
        revoked = False

        def step(chunk: bytes) -> bytes | None:
            """The bytes to send for what was read (b"": nothing yet), or None: stop (the key
            was revoked, or the filter blocked the stream: ``tail`` holds what is left to send)."""
            nonlocal keys_seen, revoked, tail
            if self.keys.version != keys_seen:
                keys_seen = self.keys.version
                if not self.keys.has_id(ctx.key_id):
                    revoked = True
                    return None
            data = frames.feed(chunk)
            if not data:
                return b""
            out = relay.process(data)
            if relay.blocked:
                tail = out
                return None
            return out

        writer = scope.get(CHUNKS) if scope else None  # our HTTP layer's (http.py); None under another server
        read = resp.content.readany  # what iter_any() awaits, without its extra coroutine per chunk
        try:
            stopped = False
            while chunk := await read():
                out = step(chunk)
                if out is None:
                    stopped = True
                    break
                if out:
                    if ctx.ttft_s is None:
                        ctx.ttft_s = time.perf_counter() - ctx.t0
                    if not ctx.started:
                        ctx.status, ctx.started = resp.status, True
                        await send(start)
                    await send({"type": "http.response.body", "body": gz.chunk(out) if gz else out,
                                "more_body": True})
                    if writer is not None and writer.ready() and hasattr(resp, "push"):
                        stopped = await push_stream(resp, writer, step, relay, frames, gz, self.keys)
                        break
            if not stopped:
                rest = frames.rest()
                if rest:
                    tail = relay.process(rest)
                if not relay.blocked:
                    tail += relay.finish()
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels(name, "timeout").inc()
            ctx.error = "upstream timed out mid-stream"
            tail += error_event(f"Upstream '{name}' timed out", "upstream_error", "upstream_timeout")
        except (aiohttp.ClientError, ClientError) as err:
            self.metrics.upstream_errors.labels(name, "protocol").inc()
            if not ctx.started:  # nothing relayed yet: another replica may answer it (app.py)
                raise UpstreamBroke(502, f"Upstream '{name}' broke off the stream", "upstream_error",
                                    "bad_gateway") from None
            ctx.upstream_broke = True
            ctx.error = f"upstream broke off the stream: {err}"
            tail += error_event(f"Upstream '{name}' broke off the stream", "upstream_error", "bad_gateway")
        if revoked:  # the rest of the stream is not this key's any more: end it, as an error
            ctx.error = "the key was revoked during the stream"
            tail += error_event("The API key was revoked.", "invalid_request_error", "invalid_api_key") + DONE
        elif relay.blocked:
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
        ctx.done = True
        if not ctx.started:
            ctx.status, ctx.started = resp.status, True
            await send(start)
        await send({"type": "http.response.body", "body": gz.end(tail) if gz else tail, "more_body": False})
