"""Relaying an upstream SSE stream: usage capture, output filtering, optional gzip.

The app reads whatever bytes arrive, cuts them at the last blank line (``workbench.sse.EventSplitter``,
the load generator's too: SSE lines end in LF, CRLF or CR; vLLM uses LF; CR / CRLF become LF so
each event is cut out, filtered and sent once complete) and hands the complete events to
``StreamRelay.process`` at once: an event never waits for the next. Without output filtering or
moderation the bytes pass unchanged and only events mentioning ``"usage"`` are parsed. Either way
the relay counts the events that carry generated text (``streamed``), so a stream the client
drops still has a token count to charge and audit.

Every text field of a choice is filtered: ``content``, ``reasoning_content`` / ``reasoning``,
``refusal`` and ``tool_calls[].function.arguments`` (one ``StreamFilter`` each), and ``text``
of a completion.

``GzipStream`` compresses with one gzip member for the whole response and a ``Z_SYNC_FLUSH``
after every batch of complete events (in a token-by-token stream: every event), so the client
can decode each event as soon as it arrives; compression does not add a token of latency.
"""

from __future__ import annotations

import re
import zlib

from workbench.gateway.filter import StreamFilter, WordFilter
from workbench.gateway.logprobs import LogprobGuard, completion_entries, completion_logprobs
from workbench.sse import EventSplitter, event_data  # the one SSE parser; EventSplitter re-exported for relay.py

try:
    import orjson
    loads, dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    import json
    loads = json.loads

    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

try:  # zlib-ng: a drop-in deflate, ~3x less CPU for the small flushed pieces of a gzip stream
    from zlib_ng import zlib_ng as DEFLATE
except ImportError:  # pragma: no cover - the gateway extra installs it
    DEFLATE = zlib

DONE = b"data: [DONE]\n\n"
# A text field with a non-empty value: one generated token (vLLM sends a chunk per token; a chunk
# holding several, as with speculative decoding, counts once, so this can only undercount).
_TEXT_VALUE = re.compile(rb'"(?:content|text|reasoning_content|reasoning|refusal|arguments)"\s*:\s*"(?!")')
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
# For StreamRelay._passes: a text value without escapes, any text-field key, a choice's index.
_FAST_TEXT = re.compile(rb'"(content|text)":"([^"\\]*)"')
_ANY_TEXT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|refusal|arguments|name)"\s*:')
_INDEX = re.compile(rb'"index":(\d+)')


def message_slots(holder: dict) -> list[tuple[dict, str, tuple]]:
    """(container, key, name) of every text string in a chat message or delta: the content,
    reasoning and refusal, and each tool call's (or the legacy function_call's) arguments."""
    slots = [(holder, k, (k,)) for k in TEXT_FIELDS if isinstance(holder.get(k), str)]
    content = holder.get("content")
    if isinstance(content, list):  # content as parts: each text part is a field of its own
        slots += [(p, "text", ("part", n)) for n, p in enumerate(content)
                  if isinstance(p, dict) and isinstance(p.get("text"), str)]
    calls = holder.get("tool_calls")
    for j, tc in enumerate(calls if isinstance(calls, list) else ()):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            i = tc.get("index", j)
            i = i if isinstance(i, int) else j
            slots += [(fn, k, ("tool", i) if k == "arguments" else ("tool_name", i))
                      for k in ("arguments", "name") if isinstance(fn.get(k), str)]
    fc = holder.get("function_call")
    if isinstance(fc, dict):
        slots += [(fc, k, ("function_call",) if k == "arguments" else ("function_name",))
                  for k in ("arguments", "name") if isinstance(fc.get(k), str)]
    return slots


def _inject(holder: dict, name: tuple, text: str) -> None:
    """Put held-back text of the field ``name`` into a delta that may not carry that field."""
    if name[0] in ("tool", "tool_name"):
        key = "arguments" if name[0] == "tool" else "name"
        holder.setdefault("tool_calls", []).append({"index": name[1], "function": {key: text}})
    elif name[0] in ("function_call", "function_name"):
        holder.setdefault("function_call", {})["arguments" if name[0] == "function_call" else "name"] = text
    elif name[0] == "part":
        holder["content"] = [{"type": "text", "text": text}]
    else:
        holder[name[0]] = (holder.get(name[0]) or "") + text


def _with_logprobs(lp: dict, released: dict[str, list], chat: bool) -> dict:
    """A choice's logprobs holding only the released (filtered) entries of each field."""
    return {**lp, **released} if chat else {**lp, **completion_logprobs(released.get("text", []))}


def error_event(message: str, type_: str, code: str | None) -> bytes:
    """A final in-stream error, as vLLM sends one: ``data: {"error": {...}}``."""
    return b"data: " + dumps({"error": {"message": message, "type": type_, "param": None,
                                        "code": code}}) + b"\n\n"


class GzipStream:
    """One gzip member over a whole reply, flushed (``Z_SYNC_FLUSH``) after each event so the
    client can inflate every event as it comes. ``deflate``: the module that compresses, zlib-ng's
    (``DEFLATE``, where installed: the same format and size, a quarter of zlib's CPU an event,
    benchmarks/gateway_gzip.py) or the standard library's ``zlib``; their constants are equal."""

    __slots__ = ("z",)

    def __init__(self, deflate=None):
        deflate = deflate or DEFLATE
        # gzip, 4 KiB window (events repeat a ~200-byte skeleton), memLevel 4, level 1: 16 streams'
        # states fit the cache; with zlib, 1.95 us an event instead of 3.38 with (6, 31, 8)
        self.z = deflate.compressobj(1, zlib.DEFLATED, 16 + 12, 4)

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
        self.parse_all = bool(self.filter) or collect
        self.collect = collect
        self.streams: dict[tuple, StreamFilter] = {}  # (choice index, field name...) -> filter
        self.guards: dict[tuple, LogprobGuard] = {}  # the same keys: logprobs of that field
        self.texts: list[str] = []
        self.usage: dict | None = None
        self.blocked = False
        self.done = False  # upstream sent [DONE] (held back in parse_all mode; the app sends it)
        self.streamed = 0  # events passed on that carried generated text (~ completion tokens)
        self._template: dict | None = None
        self._fast: dict[tuple[bytes, bytes], StreamFilter] = {}  # _passes: (index, key) as bytes -> filter
        # _passes: (bytes before the text, after it, its filter) of the last fully checked event
        self._skeleton: tuple[bytes, bytes, StreamFilter] | None = None

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.streams.values())

    def process(self, data: bytes) -> bytes:
        if not self.parse_all:  # pass-through: only an event that mentions usage is parsed
            self.streamed += len(_TEXT_VALUE.findall(data))
            if b'"usage"' not in data:
                return data
            return b"".join(self._event(ev) if b'"usage"' in ev else ev + b"\n\n"
                            for ev in data.split(b"\n\n") if ev)
        fast = self.filter is not None and not self.collect
        if fast and len(data) > 2 and data.find(b"\n\n") == len(data) - 2:  # one event (token by token)
            ev = data[:-2]
            return data if self._template is not None and not self.guards and self._passes(ev) else self._event(ev)
        out = []
        for ev in data.split(b"\n\n"):
            if ev:
                # per event: the first event parsed sets the template and logprobs set guards,
                # so the rest of a chunk holding a whole reply can still take the fast path
                if fast and self._template is not None and not self.guards and self._passes(ev):
                    out.append(ev + b"\n\n")
                    continue
                out.append(self._event(ev))
                if self.blocked:
                    break
        return b"".join(out)

    def _passes(self, ev: bytes) -> bool:
        """The common event, relayed as its bytes without a JSON round trip: one choice, one plain
        text value (ASCII, no escapes), nothing else to filter or count (no finish_reason, logprobs,
        tool calls or usage), text the filter lets through whole now (``StreamFilter.passes``);
        else ``_event``. ~5 us, not ~15; ~1.5 us for the last passed event with another value (no
        quote or backslash in it: every check reads the same, as they all hinge on quoted keys)."""
        sk = self._skeleton
        if sk is not None:
            pre, post, sf = sk
            end = len(ev) - len(post)
            if end >= len(pre) and ev.startswith(pre) and ev.endswith(post):
                value = ev[len(pre):end]
                if b'"' not in value and b"\\" not in value:
                    if not value.isascii() or not sf.passes(value.decode()):
                        return False
                    self.streamed += bool(value)
                    return True
        if not ev.startswith(b"data: {") or b'"finish_reason":null' not in ev or b'"usage"' in ev \
                or b'"logprobs":{' in ev or b'"tool_calls"' in ev or b'"function_call"' in ev \
                or ev.count(b'"index"') != 1 or b"\\" in ev:
            return False
        m = _FAST_TEXT.findall(ev)
        if len(m) != 1 or len(_ANY_TEXT.findall(ev)) != 1:
            return False
        (key, value), = m
        if key != (b"content" if self.chat else b"text"):
            return False
        idx = _INDEX.search(ev)
        if idx is None:  # "index": 0, spaced: the slow path reads it
            return False
        fkey = (idx.group(1), key)
        sf = self._fast.get(fkey)
        if sf is None:
            skey = (int(fkey[0]), key.decode())
            sf = self.streams.get(skey)
            if sf is None:
                sf = self.streams[skey] = self.filter.stream()
            self._fast[fkey] = sf
        if not value.isascii() or not sf.passes(value.decode()):
            return False
        start = ev.find(b'"' + key + b'":"') + len(key) + 4  # the one match (no backslash in ev)
        self._skeleton = (ev[:start], ev[start + len(value):], sf)
        self.streamed += bool(value)  # the role-only first delta ("content":"") is no token
        return True

    def _event(self, ev: bytes) -> bytes:
        raw = ev + b"\n\n"
        value = event_data(ev)  # the one SSE parser: several data lines are one value (LF-joined)
        if value is None:
            return raw  # comments, keep-alives
        # "event:" / "id:" lines and comments are kept, relayed before the (rewritten) data line
        head = b"" if ev.startswith(b"data:") and b"\n" not in ev else b"".join(
            ln + b"\n" for ln in ev.split(b"\n") if ln and ln.partition(b":")[0] != b"data")
        payload = value.strip()
        if payload == b"[DONE]":
            if not self.parse_all:
                return raw
            self.done = True
            return b""
        try:
            obj = loads(payload)
        except ValueError:
            return self._unparsed(head, payload, raw)
        if not isinstance(obj, dict):
            return self._unparsed(head, payload, raw)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.strip_usage and not obj.get("choices"):
                return b""
        if not self.parse_all:
            return raw
        changed, texts = False, 0
        choices = obj.get("choices")
        for ch in choices if isinstance(choices, list) else ():
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            idx = idx if isinstance(idx, int) else 0
            holder = ch.get("delta") if self.chat else ch
            if not isinstance(holder, dict):
                continue
            slots = message_slots(holder) if self.chat else \
                ([(ch, "text", ("text",))] if isinstance(ch.get("text"), str) else [])
            finished = ch.get("finish_reason") is not None
            seen = set()
            lp = ch.get("logprobs") if self.filter else None
            lp_in: dict[str, list] = {}  # logprobs key -> this event's entries for that field
            if isinstance(lp, dict):
                if self.chat:
                    lp_in = {k: lp[k] for k in ("content", "refusal") if isinstance(lp.get(k), list)}
                elif isinstance(lp.get("tokens"), list):
                    lp_in = {"text": completion_entries(lp)}
            lp_out: dict[str, list] = {}
            for box, key, name in slots:
                text = box[key]
                texts += bool(text)
                if self.filter:
                    skey = (idx, *name)
                    seen.add(skey)
                    sf = self.streams.get(skey)
                    if sf is None:
                        sf = self.streams[skey] = self.filter.stream()
                    guard = self.guards.get(skey)
                    if name[0] in lp_in or guard is not None:
                        if guard is None:
                            guard = self.guards[skey] = LogprobGuard(self.filter, sf)
                        guard.add(text, lp_in.pop(name[0], []))
                    out = sf.feed(text) if text else ""
                    if finished:
                        out += sf.flush()
                    if sf.hits and self.block:
                        self.blocked = True
                        return b""
                    if guard is not None:
                        lp_out[name[0]] = guard.release()
                    if out != text:
                        box[key] = out
                        changed = True
                    text = out
                if self.collect and text:
                    self.texts.append(text)
            if finished and self.filter:  # fields this chunk does not carry may still hold text
                for skey, sf in self.streams.items():
                    if skey[0] == idx and skey not in seen:
                        rest = sf.flush()
                        if sf.hits and self.block:
                            self.blocked = True
                            return b""
                        guard = self.guards.get(skey)
                        if guard is not None:
                            lp_out[skey[1]] = lp_out.get(skey[1], []) + guard.release()
                        if rest:
                            _inject(holder, skey[1:], rest)
                            changed = True
                            if self.collect:
                                self.texts.append(rest)
            for k in lp_in:  # entries of a field without text here: nothing to place them on, dropped
                lp_out.setdefault(k, [])
            if lp_out:
                ch["logprobs"] = _with_logprobs(lp if isinstance(lp, dict) else {}, lp_out, self.chat)
                changed = True
        self.streamed += texts
        if self._template is None:
            self._template = {k: obj.get(k) for k in ("id", "object", "created", "model")}
        return head + b"data: " + dumps(obj) + b"\n\n" if changed else raw

    def _unparsed(self, head: bytes, payload: bytes, raw: bytes) -> bytes:
        """An event that is not a JSON object passes as it is, unless the filter finds a word in
        it: then block, or its text masked (its own word list hits counted as output hits)."""
        if not self.filter:
            return raw
        text = payload.decode("utf-8", "replace")
        masked, n = self.filter.apply_mask(text)
        if not n:
            return raw
        sf = self.streams.setdefault(("raw",), self.filter.stream())
        sf.hits += n
        if self.block:
            self.blocked = True
            return b""
        return head + b"data: " + masked.encode() + b"\n\n"

    def finish(self) -> bytes:
        """Text still held back when the stream ended without a finish_reason, as one event."""
        out = []
        for skey, sf in self.streams.items():
            rest = sf.flush()
            if sf.hits and self.block:
                self.blocked = True
                return b""
            guard = self.guards.get(skey)
            entries = guard.release() if guard is not None else []
            if rest or entries:
                if self.collect:
                    self.texts.append(rest)
                if self.chat:
                    delta: dict = {}
                    _inject(delta, skey[1:], rest)
                    choice = {"index": skey[0], "delta": delta}
                else:
                    choice = {"index": skey[0], "text": rest}
                if entries:
                    choice["logprobs"] = _with_logprobs({}, {skey[1]: entries}, self.chat)
                out.append(b"data: " + dumps({**(self._template or {}), "choices": [
                    {**choice, "finish_reason": None}]}) + b"\n\n")
        return b"".join(out)
