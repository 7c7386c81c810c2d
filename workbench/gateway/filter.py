"""Sensitive-word filter: one Aho-Corasick automaton (ahocorasick-rs) over every word list.

ahocorasick-rs (Python bindings of the Rust ``aho-corasick`` crate) rather than pyahocorasick:
pyahocorasick looks a node's children up linearly, so with a Chinese list (thousands of distinct
first characters under the root) a 1,000-character prompt took ~0.9 ms for 5,000 words, against
~5 us here (benchmarks/gateway_overhead.py measures both sizes).

Words are matched as substrings, caselessly for cased scripts (the text is lowercased with its
length kept, so match offsets index the original). Chinese has no word boundaries, so substring
matching is what Chinese lists expect; keep English entries specific enough not to hit inside
innocent words.

Streams: ``StreamFilter`` holds back the tail of what it has seen that could still grow into a
word (at most ``max_word_len - 1`` characters: the longest tail that is a prefix of some word), so
a word split across two or more chunks is still caught before any of it is emitted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ahocorasick_rs

log = logging.getLogger(__name__)


def read_word_list(path: str | Path) -> list[str]:
    """One word per line; blank lines and lines starting with '#' are skipped."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            words.append(line)
    return words


def _lower(text: str) -> str:
    low = text.lower()
    if len(low) == len(text):
        return low
    # A few characters change length when lowercased ('İ' -> 'i̇'); keep those as they are so
    # offsets still index the original text.
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


class WordFilter:
    def __init__(self, words: list[str], mask: str = "***"):
        self.mask = mask
        self.words = sorted({_lower(w) for w in words if w})
        self.size = len(self.words)
        self.max_len = max((len(w) for w in self.words), default=0)
        self.automaton = ahocorasick_rs.AhoCorasick(self.words) if self.words else None
        # Every proper prefix of every word: what a stream must hold back (see StreamFilter).
        self.prefixes = frozenset(w[:k] for w in self.words for k in range(1, len(w)))

    @classmethod
    def from_files(cls, paths: list[str], mask: str = "***") -> "WordFilter":
        words = [w for p in paths for w in read_word_list(p)]
        f = cls(words, mask)
        log.info("sensitive-word filter: %d words from %d lists", f.size, len(paths))
        return f

    def spans(self, text: str) -> list[tuple[int, int]]:
        """[start, end) of every match, merged where they overlap."""
        if not self.size or not text:
            return []
        return _merge([(s, e) for _, s, e in
                       self.automaton.find_matches_as_indexes(_lower(text), overlapping=True)])

    def hits(self, text: str) -> bool:
        return bool(self.spans(text))

    def apply_mask(self, text: str) -> tuple[str, int]:
        """(text with every match replaced by the mask, number of matches)."""
        spans = self.spans(text)
        if not spans:
            return text, 0
        parts, pos = [], 0
        for s, e in spans:
            parts += [text[pos:s], self.mask]
            pos = e
        parts.append(text[pos:])
        return "".join(parts), len(spans)

    def stream(self) -> "StreamFilter":
        return StreamFilter(self)


class StreamFilter:
    """Filter text that arrives in pieces. ``feed`` returns what may be emitted now; ``flush``
    the held-back rest at the end. ``hits`` counts matches; with block, the caller stops at the
    first (the matched word itself is never emitted: it is still in the held-back tail)."""

    __slots__ = ("f", "buf", "base", "pending", "hits", "_hold")

    def __init__(self, f: WordFilter):
        self.f = f
        self.buf = ""  # text seen but not yet emitted
        self.base = 0  # stream offset of buf[0]
        self.pending: list[tuple[int, int]] = []  # matches (stream offsets) reaching into buf
        self.hits = 0
        self._hold = max(0, f.max_len - 1)

    def feed(self, text: str) -> str:
        self.buf += text
        return self._emit(len(self.buf) - self._prefix_len())

    def _prefix_len(self) -> int:
        """Length of the longest tail of buf that starts a word: all that must be held back (a
        word that ends later starts inside it). Usually 0 or 1, so the filter delays text by at
        most a few characters, not by ``max_word_len - 1``."""
        prefixes, tail = self.f.prefixes, _lower(self.buf[-self._hold:]) if self._hold else ""
        for k in range(len(tail), 0, -1):
            if tail[-k:] in prefixes:
                return k
        return 0

    def flush(self) -> str:
        return self._emit(len(self.buf))

    def _emit(self, cut: int) -> str:
        new = [(s + self.base, e + self.base) for s, e in self.f.spans(self.buf)]
        known = {s for s, _ in self.pending}
        self.hits += sum(1 for s, _ in new if s not in known)
        spans = _merge(self.pending + new)
        if cut <= 0:
            self.pending = spans
            return ""
        end = self.base + cut
        parts, pos = [], self.base
        for s, e in spans:
            if s >= end:
                break
            if s > pos:
                parts.append(self.buf[pos - self.base:s - self.base])
            if s >= self.base:  # a match that started earlier was masked when it started
                parts.append(self.f.mask)
            pos = max(pos, min(e, end))
        if pos < end:
            parts.append(self.buf[pos - self.base:cut])
        self.pending = [(s, e) for s, e in spans if e > end]
        self.buf, self.base = self.buf[cut:], end
        return "".join(parts)
