"""The gateway: a raw ASGI app in front of OpenAI-compatible upstreams (vLLM).

    uvicorn --factory workbench.gateway.app:from_env   # GATEWAY_CONFIG=deploy/gateway.yaml
    workbench gateway --config deploy/gateway.yaml     # the same, with uvloop + httptools

Per request: header size -> API key -> rate limits -> body size / JSON / schema -> model route ->
sensitive-word filter and moderation on the prompt -> upstream (one keep-alive pool, client.py,
asyncio + httptools; one retry on connect errors) -> reply relayed (SSE passes through event by
event, optionally gzip) -> metrics + one audit row. Raw ASGI rather than a framework because the
goal is <= 1 ms added at p50: no routing tables, no middleware stack, no per-request models.
Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from functools import partial

from workbench.gateway.audit import AuditCollector, AuditLog
from workbench.gateway.checks import Checks
from workbench.gateway.config import GatewayConfig, GatewayConfigError, load_config
from workbench.gateway.filter import FilterWorker, WordFilter
from workbench.gateway.http import GONE, ON_GONE, REFUSED
from workbench.gateway.intake import Intake
from workbench.gateway.keys import KeyStore, watch_keys
from workbench.gateway.metrics import Metrics
from workbench.gateway.moderation import build_policy
from workbench.gateway.openapi import compile_validators, document
from workbench.gateway.relay import Ctx, Replies, respond, settle, stream_tokens
from workbench.gateway.sse import dumps
from workbench.gateway.store import StoreUnavailable, build_store
from workbench.gateway.tokens import PromptCounter, load_tokenizer
from workbench.gateway.upstream import ClientGone, GatewayError, UpstreamBroke, Upstreams


class RetryOther(Exception):
    """A 5xx before any byte reached the client: the request goes to another replica."""

log = logging.getLogger(__name__)

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
          "/v1/embeddings": "embeddings"}
OTHER = {"/v1/models", "/metrics", "/openapi.json"}


class Gateway(Intake, Replies, Checks):
    def __init__(self, cfg: GatewayConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        self.routes = cfg.model_routes()
        self.keys = KeyStore(cfg.all_keys())
        self.store = build_store(cfg.limits)  # buckets: this process, or Redis (shared)
        self._settling: set[asyncio.Task] = set()  # Redis token settlements in flight
        if not len(self.keys):
            log.warning("gateway has no API keys: every request but /health gets 401 "
                        "(add one: workbench gateway add-key ID)")
        self.metrics = metrics or Metrics()
        self.validators = compile_validators()
        f = cfg.filter
        self.filter = WordFilter.from_files(f.word_lists, f.mask, f.cjk_ignore_spaces) if f.enabled else None
        # prompts over OFF_LOOP_CHARS are matched in a worker process (filter.FilterWorker)
        self.filter_worker = FilterWorker(self.filter, f.word_lists, f.mask, f.cjk_ignore_spaces) if self.filter else None
        # Each inference route's and model's latency series exist from the start, at zero (as
        # Prometheus advises): a series that first appears with a request makes rate() extrapolate
        # its buckets unevenly, which skews a recorded quantile toward the next bucket up.
        for route, kind in ROUTES.items():
            for model in self.routes:
                self.metrics.latency.labels(route, model)
                if kind != "embeddings":  # no first token there
                    self.metrics.ttft.labels(route, model)
        self.upstreams = Upstreams(cfg, self.metrics, self.routes)
        self.counters = {name: self._counter(name, u.tokenizer) for name, u in cfg.upstreams.items()}
        self.policy = build_policy(cfg.moderation, self.upstreams.chat)
        self.audit = AuditLog(cfg.audit) if cfg.audit.enabled else None
        if self.audit:
            self.metrics.registry.register(AuditCollector(self.audit))
        self.openapi = dumps(document(sorted(self.routes)))
        self._key_watch: asyncio.Task | None = None
        self.reading: dict[str, int] = {}  # key id -> its requests whose body is arriving (max_key_share)
        self.key_cap = max(1, int(cfg.http.max_client_connections * cfg.http.max_key_share))

    def _counter(self, name: str, path: str | None) -> PromptCounter:
        lim = self.cfg.limits
        try:
            tok = load_tokenizer(path) if path else None
        except Exception as err:  # a missing file or one tokenizers cannot read: say which key
            raise GatewayConfigError(f"upstreams.{name}.tokenizer: cannot load {path}: {err}") from None
        return PromptCounter(tok, lim.media_part_tokens, lim.template_tokens, lim.message_tokens)

    # ---- lifecycle -------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._key_watch is not None:
            self._key_watch.cancel()
        await self.upstreams.aclose()
        await self.store.aclose()
        if self.filter_worker is not None:
            await asyncio.to_thread(self.filter_worker.close, True)
        if self.audit:
            await asyncio.to_thread(self.audit.close)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    try:
                        await self.store.start()
                    except StoreUnavailable as err:
                        await send({"type": "lifespan.startup.failed", "message": str(err)})
                        return
                    await self.upstreams.start()  # the pool and health checks, on the server's loop
                    self._key_watch = watch_keys(self)
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # ---- one request -----------------------------------------------------------------------
    async def _handle(self, scope, receive, send) -> None:
        path = scope["path"]
        if path == "/health":
            return await respond(send, 200, b'{"status":"ok"}')
        if path == "/ready":  # readiness: 503 while audit rows cannot be written or limits checked
            problem = (self.audit.problem() if self.audit else None) or self.store.problem()
            return await respond(send, 503 if problem else 200,
                                 dumps({"status": "unavailable", "reason": problem} if problem else {"status": "ok"}))
        ctx = Ctx(path)
        client = scope.get("client")
        ctx.client = client[0] if client else None
        try:
            auth, length, gzip = self._headers(scope["headers"])
            key = self.keys.lookup(auth)
            if key is None:
                raise GatewayError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                                   "invalid_request_error", "invalid_api_key", headers=(
                                       (b"www-authenticate", b'Bearer realm="gateway"' + (
                                           b', error="invalid_token"' if auth else b"")),))
            ctx.key_id = key.id
            if (key.role == "metrics") != (path == "/metrics"):
                raise GatewayError(403, "This key may not use this route: /metrics takes a metrics key "
                                   "(add-key ID --metrics), every other route a client key.",
                                   "invalid_request_error", "wrong_key_role")
            route = ROUTES.get(path)
            method = scope["method"]
            if route is None and path not in OTHER:
                raise GatewayError(404, f"Unknown path {path}", code="unknown_url")
            if (method != "POST") if route else (method not in ("GET", "HEAD")):
                raise GatewayError(405, f"Method {method} not allowed on {path}", code="method_not_allowed")
            if route and self.cfg.audit.fail_closed and self.audit and not self.audit.ok:
                raise GatewayError(503, "Requests are refused while the audit log cannot be written.",
                                   "server_error", "audit_unavailable")
            if route or path == "/v1/models":  # limits guard the upstreams (/v1/models asks them all)
                await self._rate_limit(key)
            if route:
                await self._proxy(ctx, route, scope, receive, send, length, gzip, key)
            elif path == "/v1/models":
                ctx.status = 200
                await respond(send, 200, dumps({"object": "list", "data": await self.upstreams.models()}))
            elif path == "/metrics":
                body, ctype = self.metrics.render()
                ctx.status = 200
                await respond(send, 200, body, ctype.encode())
            else:
                ctx.status = 200
                await respond(send, 200, self.openapi)
        except GatewayError as err:
            ctx.status, ctx.error = err.status, err.message
            if not ctx.started:
                await respond(send, err.status, err.body(),
                              headers=(*err.headers, (b"x-request-id", ctx.request_id.encode())))
        except ClientGone:
            ctx.status, ctx.error = scope.get(REFUSED, (499, "client disconnected"))
        except asyncio.CancelledError:
            if not ctx.client_gone:  # the graceful-shutdown timeout ran out: say so, then stop
                ctx.status, ctx.error = 503, "cancelled: the gateway is shutting down"
                asyncio.current_task().uncancel()  # ended here, not re-raised: no traceback per request
                if not ctx.started:
                    await respond(send, 503, GatewayError(503, "The gateway is shutting down; retry.",
                                                          "server_error", "shutting_down").body(),
                                  headers=((b"x-request-id", ctx.request_id.encode()),))
                else:  # a stream cut short: end the body, so the server does not call it a bug
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return  # (finally: its audit row)
            asyncio.current_task().uncancel()
            ctx.status, ctx.error = scope.get(REFUSED, (499, "client disconnected"))  # 499: nginx's code
        except Exception as err:  # a bug: still an OpenAI-shaped 500 and an audit row
            log.exception("gateway error on %s", path)
            ctx.status, ctx.error = 500, f"{type(err).__name__}: {err}"
            if not ctx.started:
                await respond(send, 500, GatewayError(500, "Internal gateway error", "server_error").body(),
                              headers=((b"x-request-id", ctx.request_id.encode()),))
        finally:
            self._finish(ctx)

    async def _proxy(self, ctx: Ctx, route: str, scope, receive, send, length: int, gzip: bool, key) -> None:
        body = await self._read_key_body(receive, length, key)
        req = self._parse(route, ctx.path, body)
        model = req["model"]
        ctx.model = model[:200]
        upstream = self.routes.get(model)
        if upstream is None:
            raise GatewayError(404, f"The model '{model[:200]}' does not exist (GET /v1/models lists them).",
                               code="model_not_found", param="model")
        stream = route != "embeddings" and req.get("stream") is True
        ctx.stream = stream
        if route == "chat" and self.cfg.limits.media_hosts is not None:
            self._check_media(req)
        changed = await self._check_prompt(ctx, route, req, upstream)
        if self.policy and self.cfg.moderation.before:
            await self._moderate(ctx, ctx.prompt, "input")
        if key.tokens is not None:
            await self._reserve_tokens(ctx, key, route, req, upstream)
        strip_usage = False
        if stream:
            opts = req.get("stream_options") or {}
            if not opts.get("include_usage"):  # we need usage to count tokens; the client did not ask
                req["stream_options"] = {**opts, "include_usage": True}
                strip_usage = changed = True
        if changed:
            body = dumps(req)
        self.metrics.overhead.labels(route).observe(time.perf_counter() - ctx.t0)

        # A client that goes away cancels the request (and so its upstream call: vLLM aborts it).
        # Our HTTP layer calls a hook on the scope (http.ON_GONE); under another server a task
        # waits on receive() for the disconnect.
        me = asyncio.current_task()
        hooked = ON_GONE in scope
        if hooked:
            if scope[ON_GONE] is GONE:  # it left while the prompt was checked
                ctx.client_gone = True
                raise ClientGone()
            scope[ON_GONE] = partial(self._gone, me, ctx)
        else:
            watcher = asyncio.create_task(self._watch(receive, me, ctx))
        pool = self.upstreams.pools[upstream]
        # one retry on another replica for a request that failed before any byte reached the client
        tries, avoid = (2 if len(pool) > 1 else 1), None
        try:
            ctx.upstream_called = True
            for attempt in range(tries):
                resp = await self.upstreams.post(upstream, ctx.path, body, avoid=avoid)
                replica, retry = resp._replica, attempt + 1 < tries
                try:
                    if resp.status >= 500:
                        pool.request_failed(replica, f"HTTP {resp.status}")
                    if resp.status >= 500 and retry:
                        await self.upstreams.read(upstream, resp)  # drained: the connection is reused
                        self.metrics.upstream_errors.labels(upstream, f"http_{resp.status}").inc()
                        raise RetryOther(f"HTTP {resp.status}")
                    if resp.status >= 400:
                        await self._relay_error(ctx, upstream, resp, send)
                    elif stream and resp.content_type == "text/event-stream":
                        await self._relay_stream(ctx, route, resp, send, gzip, strip_usage, scope)
                    else:
                        await self._relay_body(ctx, route, resp, send)
                    if ctx.upstream_broke:  # a stream broken off after bytes reached the client
                        pool.request_failed(replica, "stream broken off")
                    elif resp.status < 500:
                        pool.request_ok(replica)
                    resp.release()
                    break
                except UpstreamBroke as err:  # unreadable reply, stream broken before any byte
                    pool.request_failed(replica, err.message)
                    if not retry or ctx.started:
                        raise
                    log.warning("upstream %s: %s on %s; retrying on another replica", upstream, err.message,
                                replica.url)
                except RetryOther as err:
                    log.warning("upstream %s: %s from %s; retrying on another replica", upstream, err,
                                replica.url)
                finally:
                    resp.close()  # no-op after release; on cancel it drops the connection: vLLM aborts
                avoid = replica
        finally:
            ctx.done = True
            if hooked:
                scope[ON_GONE] = None
            else:
                watcher.cancel()

    @staticmethod
    def _gone(task: asyncio.Task, ctx: Ctx) -> None:
        """Cancel the request's task: its client went away (uvicorn's send() is silent then)."""
        if not ctx.done:
            ctx.client_gone = True
            task.cancel()

    async def _watch(self, receive, task: asyncio.Task, ctx: Ctx) -> None:
        """``_gone`` on the disconnect, where the HTTP layer has no hook (plain uvicorn)."""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self._gone(task, ctx)
                return

    # ---- after every request -------------------------------------------------------------
    def _finish(self, ctx: Ctx) -> None:
        latency = time.perf_counter() - ctx.t0
        if ctx.relay is not None:
            stream_tokens(ctx)
        if self.audit:  # first: nothing below can cost the request its row
            self.audit.record((
                ctx.ts, ctx.request_id, ctx.key_id, ctx.path[:200], ctx.model, ctx.status,
                ctx.prompt_tokens, ctx.completion_tokens, latency * 1000,
                ctx.ttft_s * 1000 if ctx.ttft_s is not None else None, int(ctx.stream),
                " ".join(ctx.moderation) or None, " ".join(ctx.filter) or None,
                self.audit.prompt_value(ctx.prompt), ctx.error, ctx.client))
        if ctx.charged is not None:
            self._settle(ctx.charged, settle(ctx))
        route = ctx.path if ctx.path in ROUTES or ctx.path in OTHER else "other"
        model = ctx.model if ctx.model in self.routes else ""  # no label per unknown model name
        m = self.metrics
        m.requests.labels(route, model, str(ctx.status)).inc()
        m.latency.labels(route, model).observe(latency)
        if ctx.ttft_s is not None:
            m.ttft.labels(route, model).observe(ctx.ttft_s)
        if ctx.prompt_tokens:
            m.tokens.labels(model, "prompt").inc(ctx.prompt_tokens)
        if ctx.completion_tokens:
            m.tokens.labels(model, "completion").inc(ctx.completion_tokens)


def create_app(cfg: GatewayConfig) -> Gateway:
    return Gateway(cfg)


def from_env() -> Gateway:
    """For ``uvicorn --factory``: the config file named by $GATEWAY_CONFIG (default deploy/gateway.yaml)."""
    return Gateway(load_config(os.environ.get("GATEWAY_CONFIG", "deploy/gateway.yaml")))
