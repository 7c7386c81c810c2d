"""Relaying an upstream SSE stream: usage capture, output filtering, optional gzip.

The app reads whatever bytes arrive, cuts them at the last blank line (``\\n\\n``: vLLM ends
every event so), and hands the complete events to ``StreamRelay.process`` at once, so an event
never waits for the next one. Without output filtering or moderation the bytes pass unchanged
and only events mentioning ``"usage"`` are parsed.

``GzipStream`` compresses with one gzip member for the whole response and a ``Z_SYNC_FLUSH``
after every batch of complete events (in a token-by-token stream: every event), so the client
can decode each event as soon as it arrives; compression does not add a token of latency.
"""

from __future__ import annotations

import zlib

from workbench.gateway.filter import StreamFilter, WordFilter

try:
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    import json

    loads = json.loads

    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

DONE = b"data: [DONE]\n\n"


def error_event(message: str, type_: str, code: str | None) -> bytes:
    """A final in-stream error, as vLLM sends one: ``data: {"error": {...}}``."""
    return b"data: " + dumps({"error": {"message": message, "type": type_, "param": None,
                                        "code": code}}) + b"\n\n"


class GzipStream:
    __slots__ = ("z",)

    def __init__(self):
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip header + trailer

    def chunk(self, data: bytes) -> bytes:
        return self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)

    def end(self, data: bytes = b"") -> bytes:
        return self.z.compress(data) + self.z.flush(zlib.Z_FINISH)


class StreamRelay:
    """State of one relayed stream. ``parse_all`` is on when events must be rewritten (filter,
    hidden usage chunk) or their text collected (after-generation moderation)."""

    def __init__(self, kind: str, word_filter: WordFilter | None, block: bool,
                 strip_usage: bool, collect: bool):
        self.chat = kind == "chat"
        self.filter = word_filter if word_filter and word_filter.size else None
        self.block = block
        self.strip_usage = strip_usage  # the client did not ask for usage; we did, to count tokens
        self.collect = collect
        self.parse_all = bool(self.filter) or collect
        self.streams: dict[int, StreamFilter] = {}
        self.texts: list[str] = []
        self.usage: dict | None = None
        self.blocked = False
        self.done = False  # upstream sent [DONE] (held back in parse_all mode; the app sends it)
        self._template: dict | None = None

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.streams.values())

    def process(self, data: bytes) -> bytes:
        if not self.parse_all:  # pass-through: only an event that mentions usage is parsed
            if b'"usage"' not in data:
                return data
            return b"".join(self._event(ev) if b'"usage"' in ev else ev + b"\n\n"
                            for ev in data.split(b"\n\n") if ev)
        out = []
        for ev in data.split(b"\n\n"):
            if ev:
                out.append(self._event(ev))
                if self.blocked:
                    break
        return b"".join(out)

    def _event(self, ev: bytes) -> bytes:
        raw = ev + b"\n\n"
        if not ev.startswith(b"data:"):
            return raw  # comments, keep-alives
        payload = ev[5:].strip()
        if payload == b"[DONE]":
            if not self.parse_all:
                return raw
            self.done = True
            return b""
        try:
            obj = loads(payload)
        except ValueError:
            return raw
        if not isinstance(obj, dict):
            return raw
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.strip_usage and not obj.get("choices"):
                return b""
        if not self.parse_all:
            return raw
        changed = False
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            holder = ch.get("delta") if self.chat else ch
            key = "content" if self.chat else "text"
            if not isinstance(holder, dict):
                continue
            text = holder.get(key)
            text = text if isinstance(text, str) else ""
            if self.filter:
                sf = self.streams.get(ch.get("index", 0))
                if sf is None:
                    sf = self.streams[ch.get("index", 0)] = self.filter.stream()
                out = sf.feed(text) if text else ""
                if ch.get("finish_reason") is not None:
                    out += sf.flush()
                if sf.hits and self.block:
                    self.blocked = True
                    return b""
                if out != text:
                    holder[key] = out
                    changed = True
                text = out
            if self.collect and text:
                self.texts.append(text)
        if self._template is None:
            self._template = {k: obj.get(k) for k in ("id", "object", "created", "model")}
        return b"data: " + dumps(obj) + b"\n\n" if changed else raw

    def finish(self) -> bytes:
        """Text still held back when the stream ended without a finish_reason, as one event."""
        out = []
        for idx, sf in self.streams.items():
            rest = sf.flush()
            if sf.hits and self.block:
                self.blocked = True
                return b""
            if rest:
                if self.collect:
                    self.texts.append(rest)
                delta = {"content": rest} if self.chat else None
                choice = {"index": idx, "delta": delta} if self.chat else {"index": idx, "text": rest}
                out.append(b"data: " + dumps({**(self._template or {}), "choices": [
                    {**choice, "finish_reason": None}]}) + b"\n\n")
        return b"".join(out)
