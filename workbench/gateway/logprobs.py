"""Output filtering of log-probabilities: the tokens of ``logprobs`` spell the text, so they are
filtered with it.

A choice's ``logprobs`` lists, per generated token, the token's text and its ``top_logprobs``
alternatives (chat: ``logprobs.content[]`` / ``logprobs.refusal[]`` entries ``{token, logprob,
bytes, top_logprobs}``; completions: parallel lists ``tokens``, ``token_logprobs``,
``top_logprobs`` (dicts), ``text_offset``). Relayed as they come, they would hand a masked word
to the client token by token, and in a stream they would arrive before the text that a block
stops. ``LogprobGuard`` follows one text field's ``StreamFilter``:

- an entry is held back until the filter has let the text it covers out (``StreamFilter.base``),
  so a blocked stream never sends it, and a masked word's tokens are known to be masked;
- a released entry overlapping a masked span becomes the mask (the span's first token) or ``""``
  (the others), with no bytes and no alternatives;
- an alternative token that would complete a listed word after the text before it (or is one)
  is dropped from ``top_logprobs``.

Entries are placed on the text by their tokens' lengths; where those do not add up to the text
of the event (partial UTF-8 tokens), every entry of the event covers the event's whole text.
"""

from __future__ import annotations

from workbench.gateway.filter import StreamFilter, WordFilter


def completion_entries(lp: dict) -> list[dict]:
    """A completion's parallel logprobs lists as one entry per token."""
    tokens = lp.get("tokens")
    if not isinstance(tokens, list):
        return []
    cols = {k: lp.get(k) if isinstance(lp.get(k), list) else [] for k in
            ("token_logprobs", "top_logprobs", "text_offset")}
    return [{"token": t if isinstance(t, str) else "", **{k: (v[i] if i < len(v) else None) for k, v in cols.items()}}
            for i, t in enumerate(tokens)]


def completion_logprobs(entries: list[dict]) -> dict:
    """The parallel lists back from entries."""
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e.get("token_logprobs") for e in entries],
            "top_logprobs": [e.get("top_logprobs") for e in entries],
            "text_offset": [e.get("text_offset") for e in entries]}


class LogprobGuard:
    """Holds one text field's logprob entries until their text is out, then redacts them."""

    __slots__ = ("f", "sf", "held", "pos", "text", "text_base")

    def __init__(self, f: WordFilter, sf: StreamFilter):
        self.f, self.sf = f, sf
        self.held: list[tuple[int, int, dict, bool]] = []  # (start, end) stream offsets, entry, aligned
        self.pos = 0  # stream offset of the end of the text added so far
        self.text, self.text_base = "", 0  # recent original text (context for alternatives)

    def add(self, text: str, entries: list) -> None:
        """The entries that came with ``text``; call before ``sf.feed(text)``."""
        start, entries = self.pos, [e for e in entries if isinstance(e, dict)]
        lens = [len(e["token"]) if isinstance(e.get("token"), str) else -1 for e in entries]
        if sum(lens) == len(text) and min(lens, default=0) >= 0:
            for e, n in zip(entries, lens):
                self.held.append((start, start + n, e, True))
                start += n
        else:
            self.held += [(start, start + len(text), e, False) for e in entries]
        self.pos += len(text)
        self.text += text

    def release(self) -> list[dict]:
        """Entries whose text the filter has emitted (or masked), redacted where needed."""
        upto, out = self.sf.base, []
        while self.held and self.held[0][1] <= upto:
            s, e, entry, aligned = self.held.pop(0)
            out.append(self._redact(s, e, entry, aligned))
        keep_from = (self.held[0][0] if self.held else upto) - self.f.max_len
        if keep_from > self.text_base:
            self.text, self.text_base = self.text[keep_from - self.text_base:], keep_from
        masked = self.sf.masked
        if masked:
            first = self.held[0][0] if self.held else upto
            self.sf.masked = [m for m in masked if m[1] > first]
        return out

    def _redact(self, s: int, e: int, entry: dict, aligned: bool) -> dict:
        hits = [(ms, me) for ms, me in self.sf.masked if ms < e and s < me]
        if hits:
            if aligned:  # the token's own text, masked as the text was: " bad" -> " ***"
                tok, token, pos = entry["token"], "", s
                for ms, me in sorted(hits):
                    if ms > pos:
                        token += tok[pos - s:ms - s]
                    if ms >= s:
                        token += self.f.mask
                    pos = max(pos, me)
                if pos < e:
                    token += tok[pos - s:]
            else:
                token = self.f.mask if s <= hits[0][0] else ""
            out = {**entry, "token": token}
            if "bytes" in entry:
                out["bytes"] = list(token.encode())
            top = entry.get("top_logprobs")
            if top is not None:
                out["top_logprobs"] = {} if isinstance(top, dict) else []
            return out
        top = entry.get("top_logprobs")
        if not top:
            return entry
        context = self.text[max(0, s - self.f.max_len - self.text_base):max(0, s - self.text_base)]
        if isinstance(top, dict):
            kept = {t: v for t, v in top.items() if not self._completes(context, t)}
        elif isinstance(top, list):
            kept = [a for a in top if not (isinstance(a, dict) and self._completes(context, a.get("token")))]
        else:
            return entry
        return entry if len(kept) == len(top) else {**entry, "top_logprobs": kept}

    def _completes(self, context: str, token) -> bool:
        """Whether ``token`` after ``context`` ends a listed word inside the token."""
        if not isinstance(token, str) or not token:
            return False
        return any(end > len(context) for _, end in self.f.spans(context + token))


def filter_choice_logprobs(f: WordFilter, lp, fields: dict[str, str], chat: bool):
    """Non-streamed: ``fields`` maps a logprobs key (content / refusal / text) to the original
    text of that field. Returns the filtered logprobs (None when it cannot be aligned)."""
    if not isinstance(lp, dict):
        return lp
    out = dict(lp)
    for key in ("content", "refusal") if chat else ("text",):
        entries = (lp.get(key) if chat else completion_entries(lp))
        if not isinstance(entries, list) or not entries:
            continue
        # a field without text (content null beside tool calls): its tokens are its text
        text = fields.get(key)
        if text is None:
            text = "".join(e["token"] for e in entries if isinstance(e, dict) and isinstance(e.get("token"), str))
        sf = f.stream()
        guard = LogprobGuard(f, sf)
        guard.add(text, entries)
        sf.feed(text)
        sf.flush()
        released = guard.release()
        out[key] = released if chat else None
        if not chat:
            out.update(completion_logprobs(released))
            out.pop("text", None)
    return out
