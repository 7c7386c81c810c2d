"""API keys (stored as SHA-256, looked up by hash) and per-key token-bucket rate limits.

Keys in ``keys_file`` reload without a restart: the file is re-read when it changes (checked every
``keys_reload_s``) and on SIGHUP, so `workbench gateway add-key` / `revoke-key` take effect in
seconds. A key that stays keeps its buckets; a file that does not parse keeps the old keys (logged).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field

import yaml

from workbench.gateway.config import GatewayConfigError, KeyConfig

log = logging.getLogger(__name__)

KEY_PREFIX = "wb-"


def new_key() -> str:
    """A fresh client key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TokenBucket:
    """``per_minute`` units refilled continuously, holding at most one minute's worth."""

    __slots__ = ("rate_per_s", "capacity", "level", "updated")

    def __init__(self, per_minute: float):
        self.rate_per_s = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def take(self, n: float = 1.0) -> float:
        """Take n units now; returns 0, or the seconds until n would be available (nothing taken)."""
        self._refill()
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate_per_s

    def available(self) -> float:
        """The level now (negative while a request that used more than it reserved is paid off).
        The limits store checks it at admission; tokens are then reserved (``take``) and settled
        (``debit``) by the app."""
        self._refill()
        return self.level

    def debit(self, n: float) -> None:
        """Take n more (a request used more than it reserved) or, n < 0, give back what it did
        not use. The level may go negative (the next requests wait it off), never above capacity."""
        self._refill()
        self.level = min(self.capacity, self.level - n)


@dataclass
class Key:
    id: str
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    meta: dict = field(default_factory=dict)
    role: str = "client"  # client | metrics (KeyConfig.role)


class KeyStore:
    """Key hash -> Key. A key is checked by hashing what the client sent and one dict lookup, so
    no timing side channel leaks how much of a stored key matched."""

    def __init__(self, keys: list[KeyConfig]):
        self._by_hash: dict[str, Key] = {}
        self._configs: dict[str, KeyConfig] = {}
        self.version = 0  # bumped by every reload: a stream in flight re-checks its key then
        self.reload(keys)

    def has_id(self, key_id: str) -> bool:
        """Whether a key with this id is still in the store (a stream's key, after a reload)."""
        return any(k.id == key_id for k in self._by_hash.values())

    def reload(self, keys: list[KeyConfig]) -> None:
        """Swap in a new key set; a key whose config is unchanged keeps its buckets' levels."""
        old, by_hash = self._by_hash, {}
        for k in keys:
            if self._configs.get(k.sha256) == k:
                by_hash[k.sha256] = old[k.sha256]
            else:
                by_hash[k.sha256] = Key(
                    k.id, TokenBucket(k.requests_per_minute) if k.requests_per_minute else None,
                    TokenBucket(k.tokens_per_minute) if k.tokens_per_minute else None, role=k.role)
        self._by_hash, self._configs = by_hash, {k.sha256: k for k in keys}
        self.version += 1

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, authorization: bytes | None) -> Key | None:
        """The key named by an ``Authorization: Bearer <key>`` header value, or None."""
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        return self._by_hash.get(hashlib.sha256(authorization[7:].strip()).hexdigest())


def reload_keys(app) -> bool:
    """Re-read the app's keys (inline + keys_file); on a bad file keep the current ones."""
    try:
        keys = app.cfg.all_keys()
    except (GatewayConfigError, OSError, ValueError, yaml.YAMLError) as err:
        log.error("keys not reloaded, the current %d stay: %s", len(app.keys), err)
        return False
    app.keys.reload(keys)
    log.info("keys reloaded: %d", len(app.keys))
    return True


def watch_keys(app) -> asyncio.Task | None:
    """SIGHUP reloads the keys (main thread only); a task re-reads ``keys_file`` when its mtime or
    size changes. Returns that task (None without a keys_file or with keys_reload_s: 0)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reload_keys, app)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        pass  # not the main thread (GatewayServer in tests), or no SIGHUP on this platform
    path, every = app.cfg.keys_file, app.cfg.keys_reload_s
    if not path or not every:
        return None

    def stamp():
        try:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    async def poll() -> None:
        seen = stamp()
        while True:
            await asyncio.sleep(every)
            now = stamp()
            if now != seen:
                seen = now
                reload_keys(app)

    return loop.create_task(poll(), name="gateway-keys")
