"""API keys (stored as SHA-256, looked up by hash) and per-key token-bucket rate limits."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field

from workbench.gateway.config import KeyConfig

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

    def wait_s(self) -> float:
        """Seconds until the level is positive again (0: admit): the cheap check before the
        body is read. Tokens are then reserved (``take``) and settled (``debit``) by the app."""
        self._refill()
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate_per_s

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


class KeyStore:
    """Key hash -> Key. A key is checked by hashing what the client sent and one dict lookup, so
    no timing side channel leaks how much of a stored key matched."""

    def __init__(self, keys: list[KeyConfig]):
        self._by_hash = {
            k.sha256: Key(k.id,
                          TokenBucket(k.requests_per_minute) if k.requests_per_minute else None,
                          TokenBucket(k.tokens_per_minute) if k.tokens_per_minute else None)
            for k in keys}

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, authorization: bytes | None) -> Key | None:
        """The key named by an ``Authorization: Bearer <key>`` header value, or None."""
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        return self._by_hash.get(hashlib.sha256(authorization[7:].strip()).hexdigest())
