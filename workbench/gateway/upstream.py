"""The gateway's client side: one keep-alive pool for every upstream (``limits.upstream_client``:
the native client of client.py, or an aiohttp session), with the error mapping the API
promises: connect error -> one retry -> 503; connection dropped (also a stale keep-alive:
retried once) -> 502; silence past read_timeout_s -> 504. Health checks, ``/v1/models`` and the
``llm`` moderation policy use the aiohttp session either way (off the request path)."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aiohttp

from workbench.gateway import client as native

from workbench.gateway.config import GatewayConfig
from workbench.gateway.metrics import Metrics
from workbench.gateway.pool import Pool, PoolMetrics, Replica
from workbench.gateway.sse import dumps, loads

log = logging.getLogger(__name__)


class GatewayError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> bytes:
        return dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                "code": self.code}})


class ClientGone(Exception):
    pass


class UpstreamBroke(GatewayError):
    """The replica's reply could not be used (unreadable, or a stream broken off): it counts
    against the replica, and before any byte reached the client the request is retried."""


class PooledResponse(aiohttp.ClientResponse):
    """A reply that tells its pool when it is over (released or closed, whichever comes first),
    so the replica's outstanding count covers the whole relay, streams included."""

    _pool: Pool | None = None
    _replica: Replica | None = None

    def _done(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.done(self._replica)

    def release(self):
        self._done()
        return super().release()

    def close(self) -> None:
        self._done()
        super().close()


class Upstreams:
    def __init__(self, cfg: GatewayConfig, metrics: Metrics, routes: dict[str, str]):
        self.cfg, self.metrics, self.routes = cfg, metrics, routes
        lim = cfg.limits
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=lim.connect_timeout_s,
                                             sock_read=lim.read_timeout_s)
        self.headers = {
            name: {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   **({"Authorization": f"Bearer {u.api_key}"} if u.api_key else {})}
            for name, u in cfg.upstreams.items()}
        self._session: aiohttp.ClientSession | None = None
        self._client: native.Client | None = None
        self._heads: dict[tuple[str, str], tuple[str, int, bool, bytes]] = {}
        pm = PoolMetrics(metrics.registry)
        self.pools = {name: Pool(name, u, pm) for name, u in cfg.upstreams.items()}
        self.native = lim.upstream_client == "native"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            conn = aiohttp.TCPConnector(limit=self.cfg.limits.max_connections, ttl_dns_cache=300,
                                        keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent",),
                                                  response_class=PooledResponse)
        return self._session

    async def start(self) -> None:
        """On the server's loop: open the connection pool, start the replicas' health checks."""
        if self.native:
            self.client()
        for name, pool in self.pools.items():
            pool.start(self.session, self.headers[name])

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.stop()
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            self._client.close()

    async def post(self, name: str, path: str, body: bytes, avoid: Replica | None = None) -> PooledResponse:
        """POST to a replica of ``name`` (not ``avoid``, one that just failed, if another is there)."""
        pool = self.pools[name]
        tries = 2 if len(pool) == 1 else len(pool) + 1  # a refused replica is ejected: the next is another
        replica = avoid
        for attempt in range(1, tries + 1):
            last = attempt == tries
            replica = pool.pick(exclude=replica)
            try:
                return await self._send(name, pool, replica, path, body)
            except asyncio.TimeoutError:
                self.metrics.upstream_errors.labels(name, "timeout").inc()
                raise GatewayError(504, f"Upstream '{name}' timed out", "upstream_error",
                                   "upstream_timeout") from None
            except (aiohttp.ClientConnectorError, native.ConnectFailed) as err:
                self.metrics.upstream_errors.labels(name, "connect").inc()
                if last:  # clients get no address: it goes to the log
                    log.warning("upstream %s unavailable: %s", name, err)
                    raise GatewayError(503, "The model server is unavailable; retry later.",
                                       "upstream_error", "upstream_unavailable") from None
            except (aiohttp.ServerDisconnectedError, native.Disconnected) as err:  # also a stale keep-alive: retry once
                self.metrics.upstream_errors.labels(name, "disconnect").inc()
                if last:
                    log.warning("upstream %s closed the connection: %s", name, err)
                    raise GatewayError(502, "The model server closed the connection.",
                                       "upstream_error", "upstream_disconnected") from None
            except (aiohttp.ClientError, native.ClientError) as err:
                self.metrics.upstream_errors.labels(name, "protocol").inc()
                log.warning("upstream %s: bad response: %s", name, err)
                raise GatewayError(502, "Bad response from the model server.", "upstream_error",
                                   "bad_gateway") from None
        raise AssertionError("unreachable")

    def client(self) -> native.Client:
        """The native client, made on the loop that runs the requests (on first use, where the
        app is served without a lifespan)."""
        if self._client is None:
            lim = self.cfg.limits
            self._client = native.Client(lim.max_connections, lim.connect_timeout_s, lim.read_timeout_s)
        return self._client

    def _head(self, name: str, replica: Replica, path: str) -> tuple[str, int, bool, bytes]:
        """Where a POST to ``path`` on ``replica`` goes, and its request head up to Content-Length
        (built once per replica and path: the headers are those of the aiohttp path)."""
        u = urlsplit(replica.url + path[3:])  # base_url ends in /v1
        tls = u.scheme == "https"
        port = u.port or (443 if tls else 80)
        lines = [f"POST {u.path}{'?' + u.query if u.query else ''} HTTP/1.1", f"Host: {u.netloc}",
                 *(f"{k}: {v}" for k, v in self.headers[name].items())]
        head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._heads[(replica.url, path)] = found = (u.hostname or "", port, tls, head)
        return found

    async def _send(self, name: str, pool: Pool, replica: Replica, path: str, body: bytes):
        """One POST to one replica, counted as outstanding until its reply is released."""
        if self.native:
            host, port, tls, head = self._heads.get((replica.url, path)) or self._head(name, replica, path)
            client = self._client or self.client()
            call = client.request(host, port, tls, head + b"%d\r\n\r\n" % len(body), body)
            refused: type[BaseException] = native.ConnectFailed
        else:
            call = self.session.post(replica.url + path[3:], data=body,  # base_url ends in /v1
                                     headers=self.headers[name], timeout=self.timeout)
            refused = aiohttp.ClientConnectorError
        pool.begin(replica)
        try:
            resp = await call
        except BaseException as err:
            pool.done(replica)
            if isinstance(err, refused):
                pool.connect_failed(replica)
                log.warning("upstream %s: %s refused the connection: %s", name, replica.url, err)
            raise
        resp._pool, resp._replica = pool, replica
        return resp

    async def read(self, name: str, resp) -> bytes:
        try:
            return await resp.read()
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels(name, "timeout").inc()
            raise GatewayError(504, f"Upstream '{name}' timed out", "upstream_error", "upstream_timeout") from None
        except (aiohttp.ClientError, native.ClientError) as err:
            self.metrics.upstream_errors.labels(name, "protocol").inc()
            raise UpstreamBroke(502, f"Upstream '{name}' broke off its reply: {err}", "upstream_error",
                                "bad_gateway") from None

    async def models(self) -> list[dict]:
        """Every upstream's /v1/models, merged; only models this gateway routes are listed."""
        async def one(name: str) -> list[dict]:
            url = self.pools[name].pick().url + "/models"
            try:
                async with self.session.get(url, headers=self.headers[name], timeout=self.timeout) as r:
                    return (await r.json(loads=loads)).get("data") or [] if r.status == 200 else []
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
                self.metrics.upstream_errors.labels(name, "models").inc()
                log.warning("upstream %s: /models failed: %s", name, err)
                return []
        lists = await asyncio.gather(*(one(n) for n in self.cfg.upstreams))
        seen, data = set(), []
        for entries in lists:
            for m in entries:
                if isinstance(m, dict) and m.get("id") in self.routes and m["id"] not in seen:
                    seen.add(m["id"])
                    data.append(m)
        return data

    async def chat(self, model: str, messages: list[dict], max_tokens: int, timeout_s: float) -> str:
        """One non-streaming chat call through our own routes (the ``llm`` moderation policy)."""
        name = self.routes[model]
        url = self.pools[name].pick().url + "/chat/completions"
        body = dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        async with self.session.post(url, data=body, headers=self.headers[name],
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            r.raise_for_status()
            return (await r.json(loads=loads))["choices"][0]["message"]["content"] or ""
