"""A request's intake, before any policy: its headers (auth, length, gzip, their size), its body
read within the limits (and the key's share of connections while it arrives), its JSON parsed and
checked against the route's schema, the key's rate limits, and after the reply the settlement
of its token debt. ``Intake`` is a part of ``app.Gateway`` (as ``checks.Checks`` and
``relay.Replies`` are); every refusal is a ``GatewayError`` with the status and code the client
gets."""

from __future__ import annotations

import asyncio
import math

import fastjsonschema

from workbench.gateway.sse import loads
from workbench.gateway.upstream import ClientGone, GatewayError

_GZIP_SEEN: dict[bytes, bool] = {}  # header value -> accepts_gzip (clients send a handful of values)


def accepts_gzip(accept_encoding: bytes) -> bool:
    """``_accepts_gzip``, cached per header value (bounded: a new value past 256 is not cached)."""
    ok = _GZIP_SEEN.get(accept_encoding)
    if ok is None:
        ok = _accepts_gzip(accept_encoding)
        if len(_GZIP_SEEN) < 256:
            _GZIP_SEEN[accept_encoding] = ok
    return ok


def _accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether ``Accept-Encoding`` names gzip with a q-value above 0 (``gzip;q=0`` refuses it)."""
    for item in accept_encoding.lower().split(b","):
        coding, _, params = item.partition(b";")
        if coding.strip() in (b"gzip", b"x-gzip"):
            for p in params.split(b";"):
                name, _, q = p.partition(b"=")
                if name.strip() == b"q":
                    try:
                        return float(q) > 0
                    except ValueError:
                        return False
            return True
    return False


class Intake:
    """Needs from the gateway: ``cfg``, ``store``, ``metrics``, ``validators``, ``reading`` (bodies
    arriving per key id), ``key_cap`` and ``_settling`` (Redis debits in flight)."""

    def _headers(self, headers) -> tuple[bytes | None, int, bool]:
        auth, length, gzip, size = None, 0, False, 0
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = int(value) if value.isdigit() else 0
            elif name == b"accept-encoding":
                gzip = accepts_gzip(value)
        if size > self.cfg.limits.max_header_bytes:
            raise GatewayError(413, f"Request headers are {size} bytes; the limit is "
                               f"{self.cfg.limits.max_header_bytes}", code="headers_too_large")
        return auth, length, gzip

    async def _rate_limit(self, key, reserve: float = 0.0) -> None:
        store = self.store  # memory: no await on the hot path; redis: one atomic script
        adm = store.admit_now(key, reserve) if store.backend == "memory" else await store.admit(key, reserve)
        kind = adm.limit
        if kind is None:
            return
        if kind == "revoked":
            raise GatewayError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                               "invalid_request_error", "invalid_api_key")
        if kind == "store":
            raise GatewayError(503, "Rate limits cannot be checked right now; retry shortly.",
                               "server_error", "limits_unavailable", headers=((b"retry-after", b"1"),))
        self.metrics.rate_limited.labels(key.id, kind).inc()
        retry = max(1, math.ceil(adm.wait_s))
        raise GatewayError(429, f"Rate limit reached for {kind} per minute on key '{key.id}'; "
                           f"retry in {retry} s.", "rate_limit_error", "rate_limit_exceeded",
                           headers=((b"retry-after", str(retry).encode()),))

    def _settle(self, key, tokens: float) -> None:
        """Debit ``tokens`` (``relay.settle``: what the request used beyond its reservation)."""
        if not tokens:
            return
        if self.store.backend == "memory":
            key.tokens.debit(tokens)
        else:  # one script call to Redis, off the reply's path; kept referenced until it is done
            task = asyncio.ensure_future(self.store.debit(key, tokens))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _read_body(self, receive, length: int) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        if length > limit:
            raise GatewayError(413, f"Request body is {length} bytes; the limit is {limit}",
                               code="body_too_large")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"Request body exceeds the limit of {limit} bytes",
                                   code="body_too_large")
            chunks.append(chunk)
            if not msg.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _read_key_body(self, receive, length: int, key) -> bytes:
        """The body, counted against the key's share of connections while it arrives
        (http.max_key_share): one key's slow bodies cannot fill the cap and starve /health.
        Requests waiting on the upstream are not counted: that is load, not a stall."""
        held = self.reading.get(key.id, 0)
        if held >= self.key_cap:
            self.metrics.rate_limited.labels(key.id, "connections").inc()
            raise GatewayError(429, f"Key '{key.id}' has {held} request bodies arriving, its share of this "
                               "gateway's connections; retry when one is in.", "rate_limit_error",
                               "too_many_requests_in_flight", headers=((b"retry-after", b"1"),))
        self.reading[key.id] = held + 1
        try:
            return await self._read_body(receive, length)
        finally:
            left = self.reading[key.id] - 1
            if left:
                self.reading[key.id] = left
            else:
                del self.reading[key.id]

    def _parse(self, route: str, path: str, body: bytes) -> dict:
        try:
            req = loads(body)
        except ValueError as err:
            raise GatewayError(400, f"Request body is not valid JSON: {err}", code="invalid_json") from None
        try:
            self.validators[path](req)
        except fastjsonschema.JsonSchemaValueException as err:
            param = ".".join(str(p) for p in err.path[1:]) or None
            raise GatewayError(400, f"Invalid request: {err.message}", code="invalid_value",
                               param=param) from None
        return req
