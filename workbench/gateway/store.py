"""Where the gateway's per-key limit state lives: request and token buckets, and revoked keys.

Two stores behind one seam (``limits.backend``):

- ``memory`` (the default): the buckets of ``keys.TokenBucket`` in this process. One worker, no
  Redis, no I/O on the request path.
- ``redis``: one hash per bucket in Redis, changed only by Lua scripts, which Redis runs one at
  a time, so every check-and-take is atomic across workers and gateway instances. Time is the
  Redis server's (``TIME``), so the gateways' clocks need not agree. One round trip per request.

A bucket holds ``per_minute`` units and refills continuously (OpenAI's RPM / TPM). Admission takes
one request unit, and admits on the token bucket while its level covers ``reserve`` tokens (0:
while it is positive; tokens are debited after the reply, so it may go negative and later
requests wait it off). Nothing is taken from either bucket when a request is refused.

    python -c "import asyncio; from workbench.gateway.store import *"   # (a library module)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from workbench.gateway.config import LimitsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admission:
    """What a store answers: admitted (``limit`` None), or which limit refused and for how long."""

    limit: str | None = None  # None: admitted; "requests" | "tokens" | "revoked" | "store"
    wait_s: float = 0.0


ADMIT = Admission()


class StoreUnavailable(Exception):
    """The shared store cannot be reached (Redis down); the gateway answers 503."""


class MemoryStore:
    """The buckets on the ``Key`` objects of this process (keys.KeyStore made them)."""

    backend = "memory"

    def __init__(self) -> None:
        self.revoked: set[str] = set()

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def problem(self) -> str | None:
        return None

    def admit_now(self, key, reserve: float = 0.0) -> Admission:
        """The synchronous core of ``admit`` (no awaits: the hot path of a single worker)."""
        if key.id in self.revoked:
            return Admission("revoked")
        tokens, requests = key.tokens, key.requests
        if tokens is not None:
            need, level = min(reserve, tokens.capacity), tokens.available()
            if level <= 0 or level < need:
                return Admission("tokens", max(need - level, 1e-9) / tokens.rate_per_s)
        if requests is not None:
            wait = requests.take(1)
            if wait > 0:
                return Admission("requests", wait)
        if tokens is not None and reserve:
            tokens.level -= reserve
        return ADMIT

    async def admit(self, key, reserve: float = 0.0) -> Admission:
        return self.admit_now(key, reserve)

    def reserve_now(self, key, tokens: float) -> Admission:
        """Take ``tokens`` from the key's token bucket if it holds them (no request unit)."""
        wait = key.tokens.take(tokens) if key.tokens is not None else 0.0
        return ADMIT if wait <= 0 else Admission("tokens", wait)

    async def reserve(self, key, tokens: float) -> Admission:
        return self.reserve_now(key, tokens)

    async def debit(self, key, tokens: float) -> None:
        """Charge ``tokens`` (negative: give back a reservation) to the key's token bucket."""
        if key.tokens is not None and tokens:
            key.tokens.debit(tokens)

    async def revoke(self, key_id: str) -> None:
        self.revoked.add(key_id)

    async def unrevoke(self, key_id: str) -> None:
        self.revoked.discard(key_id)

    async def is_revoked(self, key_id: str) -> bool:
        return key_id in self.revoked


# KEYS: request bucket, token bucket, revoked set. ARGV: key id, rpm, tpm (0: no limit), reserve.
# Returns {code, wait_s as a string} (Lua numbers become integers in replies): 0 admitted,
# 1 revoked, 2 requests, 3 tokens.
_ADMIT_LUA = """
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return {1, '0'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, tpm, reserve = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if not l then return cap end
  return math.min(cap, l + math.max(0, now - ts) * cap / 60)
end
local function store(key, l, cap)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  -- kept until it would be full again (and so equal to a missing one), plus a second
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
local tl
if tpm > 0 then
  tl = level(KEYS[2], tpm)
  local need = math.min(reserve, tpm)
  if tl <= 0 or tl < need then
    return {3, tostring(math.max(need - tl, 1e-9) * 60 / tpm)}
  end
end
if rpm > 0 then
  local rl = level(KEYS[1], rpm)
  if rl < 1 then return {2, tostring((1 - rl) * 60 / rpm)} end
  store(KEYS[1], rl - 1, rpm)
end
if tpm > 0 and reserve > 0 then store(KEYS[2], tl - reserve, tpm) end
return {0, '0'}
"""

# KEYS: token bucket. ARGV: tpm, tokens to charge (negative: give back).
_DEBIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cap, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'l', 't')
local l, ts = tonumber(v[1]), tonumber(v[2])
if not l then l = cap else l = math.min(cap, l + math.max(0, now - ts) * cap / 60) end
l = math.min(cap, l - n)
redis.call('HSET', KEYS[1], 'l', tostring(l), 't', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - l) * 60000 / cap) + 1000)
return tostring(l)
"""

_CODES = {1: "revoked", 2: "requests", 3: "tokens"}


class RedisStore:
    """Buckets and revocations in Redis, shared by every worker and gateway instance."""

    backend = "redis"

    def __init__(self, cfg: LimitsConfig):
        import redis.asyncio as aioredis  # only where the redis backend is configured

        self.cfg = cfg
        self.prefix = cfg.redis_prefix
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.asyncio.retry import Retry

        # One retry on a connection error: after a Redis restart each pooled connection is stale
        # and fails its first command; the retry takes a fresh one (no request sees the error).
        self.redis = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.redis_timeout_s,
                                             socket_connect_timeout=cfg.redis_timeout_s,
                                             health_check_interval=30, retry=Retry(NoBackoff(), 1),
                                             retry_on_error=[RedisConnectionError])
        self._admit = self.redis.register_script(_ADMIT_LUA)
        self._debit = self.redis.register_script(_DEBIT_LUA)
        self._revoked = self.prefix + "revoked"
        self._warned = 0.0
        self.down: str | None = None  # why Redis cannot be used now (None: it answers); /ready
        self._errors = (OSError, asyncio.TimeoutError, *_redis_errors())

    async def start(self) -> None:
        """Fail at start, not on the first request, when Redis is not there."""
        try:
            await self.redis.ping()
        except Exception as err:
            raise StoreUnavailable(f"limits.backend redis: cannot reach {self.cfg.redis_url}: {err}") from None

    async def aclose(self) -> None:
        await self.redis.aclose()

    def _keys(self, key_id: str) -> list[str]:
        # {id}: a Redis Cluster hash tag, so both buckets of a key sit in one slot
        return [f"{self.prefix}{{{key_id}}}:requests", f"{self.prefix}{{{key_id}}}:tokens", self._revoked]

    def problem(self) -> str | None:
        """Why requests with limits are refused now (None: they are not); /ready reports it."""
        return None if self.cfg.redis_fail_open else self.down

    def _unavailable(self, err: Exception, unlimited: bool = False) -> Admission:
        self.down = f"limits store {self.cfg.redis_url} unreachable: {type(err).__name__}"
        if unlimited:  # a key without limits needs no bucket (its revocation: the keys file)
            return ADMIT
        now = time.monotonic()
        if now - self._warned > 10:  # one line per 10 s, not one per request
            self._warned = now
            log.error("limits store %s unreachable (%s: %s); %s", self.cfg.redis_url, type(err).__name__,
                      err, "admitting without limits" if self.cfg.redis_fail_open else "refusing with 503")
        return ADMIT if self.cfg.redis_fail_open else Admission("store")

    async def admit(self, key, reserve: float = 0.0) -> Admission:
        rpm = key.requests.capacity if key.requests is not None else 0
        tpm = key.tokens.capacity if key.tokens is not None else 0
        try:
            code, wait = await self._admit(keys=self._keys(key.id), args=[key.id, rpm, tpm, reserve])
        except self._errors as err:
            return self._unavailable(err, unlimited=not rpm and not tpm)
        self.down = None
        return ADMIT if code == 0 else Admission(_CODES[int(code)], float(wait))

    async def reserve(self, key, tokens: float) -> Admission:
        """Take ``tokens`` from the shared token bucket if it holds them (the admission script
        with no request limit), atomically across every gateway."""
        if key.tokens is None:
            return ADMIT
        try:
            code, wait = await self._admit(keys=self._keys(key.id),
                                           args=[key.id, 0, key.tokens.capacity, tokens])
        except self._errors as err:
            return self._unavailable(err)
        return ADMIT if code == 0 else Admission(_CODES[int(code)], float(wait))

    async def debit(self, key, tokens: float) -> None:
        if key.tokens is None or not tokens:
            return
        try:
            await self._debit(keys=self._keys(key.id)[1:2], args=[key.tokens.capacity, tokens])
        except self._errors as err:
            self._unavailable(err)

    async def revoke(self, key_id: str) -> None:
        await self.redis.sadd(self._revoked, key_id)

    async def unrevoke(self, key_id: str) -> None:
        await self.redis.srem(self._revoked, key_id)

    async def is_revoked(self, key_id: str) -> bool:
        return bool(await self.redis.sismember(self._revoked, key_id))


def _redis_errors() -> tuple[type[Exception], ...]:
    import redis.exceptions as e

    return (e.ConnectionError, e.TimeoutError, e.BusyLoadingError)  # not ResponseError: a bug


def build_store(cfg: LimitsConfig) -> MemoryStore | RedisStore:
    return RedisStore(cfg) if cfg.backend == "redis" else MemoryStore()
