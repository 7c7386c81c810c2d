"""Sensitive-word filter: one Aho-Corasick automaton (ahocorasick-rs) over every word list.

ahocorasick-rs (Python bindings of the Rust ``aho-corasick`` crate) rather than pyahocorasick:
pyahocorasick looks a node's children up linearly, so with a Chinese list (thousands of distinct
first characters under the root) a 1,000-character prompt took ~0.9 ms for 5,000 words, against
~5 us here (benchmarks/gateway_overhead.py measures both sizes).

Words are matched as substrings in the text as ``normalize.fold`` spells it (NFKD, invisible
characters and combining marks dropped, look-alike letters, traditional Chinese and Japanese kanji
folded, lowercase) with each run of whitespace read as one space (``bad  word``, ``bad\tword``
match ``bad word``), and each match maps back to the span of the original text it came from, so
mask mode masks ``ｂａｄ\\u200bword`` whole and keeps everything around it. Chinese has no word
boundaries, so substring matching is what Chinese lists expect; keep English entries specific
enough not to hit inside innocent words. Words written wholly in Han, kana or Hangul are also
matched with the whitespace and punctuation of the text removed (``cjk_ignore_spaces``):
``敏 感 词`` and ``敏.感.词`` match ``敏感词``; English words are not, so ``was sad`` never matches ``ass``.

Streams: ``StreamFilter`` holds back the tail of what it has seen that could still grow into a
word (at most ``max_word_len - 1`` characters: the longest tail that is a prefix of some word), so
a word split across two or more chunks is still caught before any of it is emitted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ahocorasick_rs

from workbench.gateway.normalize import (FOLD, drop_spaces, fold, index_map, nonspace_positions,
                                         cjk_segments, odd_spaces, runs_of, squeeze, squeeze_text, unsqueeze,
                                         unspaced_script)

log = logging.getLogger(__name__)


def read_word_list(path: str | Path) -> list[str]:
    """One word per line; blank lines and lines starting with '#' are skipped."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            words.append(line)
    return words


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


class WordFilter:
    def __init__(self, words: list[str], mask: str = "***", cjk_ignore_spaces: bool = True):
        self.mask = mask
        self.words = sorted({" ".join(fold(w).split()) for w in words if w} - {""})
        self.size = len(self.words)
        self.max_len = max((len(w) for w in self.words), default=0)
        self.automaton = ahocorasick_rs.AhoCorasick(self.words) if self.words else None
        # Every proper prefix of every word: what a stream must hold back (see StreamFilter).
        self.prefixes = frozenset(w[:k] for w in self.words for k in range(1, len(w)))
        # Han / kana / Hangul words, matched again in the text with its whitespace removed.
        unspaced = [w for w in self.words if len(w) > 1 and unspaced_script(w)] if cjk_ignore_spaces else []
        self.unspaced = ahocorasick_rs.AhoCorasick(unspaced) if unspaced else None
        self.unspaced_prefixes = frozenset(w[:k] for w in unspaced for k in range(1, len(w)))
        self.unspaced_max_len = max((len(w) for w in unspaced), default=0)
        self._clean: dict[bytes, bool] = {}  # clean_token's verdicts (the words never change)

    @classmethod
    def from_files(cls, paths: list[str], mask: str = "***", cjk_ignore_spaces: bool = True) -> "WordFilter":
        words = [w for p in paths for w in read_word_list(p)]
        f = cls(words, mask, cjk_ignore_spaces)
        log.info("sensitive-word filter: %d words from %d lists", f.size, len(paths))
        return f

    def spans(self, text: str) -> list[tuple[int, int]]:
        """[start, end) of every match in ``text``, merged where they overlap."""
        if not self.size or not text:
            return []
        if text.isascii() and not odd_spaces(text):  # folding is lower() here, no Han word can match
            return _merge([(s, e) for _, s, e in
                           self.automaton.find_matches_as_indexes(text.lower(), overlapping=True)])
        folded, odd, found, unspaced = self._find(text)
        if not found and not unspaced:
            return []
        idx = index_map(text)
        spans = []
        if found:
            to_folded = unsqueeze(runs_of(folded)) if odd else (lambda p: p)  # "bad  word": one space
            spans = [(idx[to_folded(s)], idx[to_folded(e - 1)] + 1) for _, s, e in found]
        spans += [(idx[s], idx[e - 1] + 1) for s, e in unspaced]
        return _merge(spans)

    def _find(self, text: str):
        """(folded, odd whitespace, matches in the squeezed text, unspaced matches in folded)."""
        folded = fold(text)
        odd = odd_spaces(folded)
        found = self.automaton.find_matches_as_indexes(squeeze_text(folded) if odd else folded,
                                                       overlapping=True)
        unspaced = []  # (start, end) in folded
        if self.unspaced is not None:
            for m in cjk_segments(folded):  # only where Han / kana / Hangul characters are
                seg = m.group()
                bare = drop_spaces(seg)
                if len(bare) == len(seg):  # nothing between them: the first pass saw it whole
                    continue
                hits = self.unspaced.find_matches_as_indexes(bare, overlapping=True)
                if hits:
                    pos = nonspace_positions(seg)
                    unspaced += [(m.start() + pos[s], m.start() + pos[e - 1] + 1) for _, s, e in hits]
        return folded, odd, found, unspaced

    def hits(self, text: str) -> bool:
        if not self.size or not text:
            return False
        if text.isascii() and not odd_spaces(text):
            return bool(self.automaton.find_matches_as_indexes(text.lower()))
        _, _, found, unspaced = self._find(text)
        return bool(found or unspaced)

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

    def clean_ascii(self, text: str) -> bool:
        """For ASCII ``text``: ``not spans(text) and not held_tail(text)`` (no match, and no word
        can start in it), from one lowercase copy: a stream's common token, checked per event."""
        if "  " in text or not text.isprintable():  # odd whitespace: the matcher squeezes it
            return not (self.held_tail(text) or self.spans(text))
        low = text.lower()
        if self.automaton is not None and self.automaton.find_matches_as_indexes(low):
            return False
        if self.max_len > 1:
            tail, prefixes = low[-(self.max_len - 1):], self.prefixes
            for k in range(len(tail), 0, -1):
                if tail[-k:] in prefixes:
                    return False
        return True

    def clean_token(self, value: bytes) -> bool:
        """A JSON string's raw bytes that are plain (ASCII, no quote, backslash, CR or LF) and
        ``clean_ascii``: remembered for up to 4,096 values (a stream's tokens repeat), the pushed
        stream's per-event check (pump.py)."""
        v = self._clean.get(value)
        if v is None:
            v = value.isascii() and not any(c in value for c in (b'"', b"\\", b"\r", b"\n")) \
                and self.clean_ascii(value.decode())
            if len(self._clean) >= 4096:
                self._clean.clear()
            self._clean[value] = v
        return v

    def stream(self) -> "StreamFilter":
        return StreamFilter(self)

    def held_tail(self, buf: str) -> int:
        """How many characters at the end of ``buf`` fold to the start of some word (so a word
        that ends in text not yet seen may begin there): what a stream must hold back."""
        if buf.isascii() and not odd_spaces(buf[-(4 * self.max_len):]):
            tail = buf[-(self.max_len - 1):].lower() if self.max_len > 1 else ""
            for k in range(len(tail), 0, -1):
                if tail[-k:] in self.prefixes:
                    return k
            return 0
        folded = fold(buf)
        squeezed, runs = squeeze(folded)
        held = _suffix_in(squeezed, self.prefixes, self.max_len - 1)
        if held and runs:  # the squeezed tail's start, in folded characters
            held = len(folded) - unsqueeze(runs)(len(squeezed) - held)
        hold = _chars_for(buf, held, False) if held else 0
        if self.unspaced is not None:
            held = _suffix_in(drop_spaces(folded), self.unspaced_prefixes, self.unspaced_max_len - 1)
            if held:
                hold = max(hold, _chars_for(buf, held, True))
        return hold


def _suffix_in(folded: str, prefixes: frozenset, longest: int) -> int:
    for k in range(min(len(folded), longest), 0, -1):
        if folded[-k:] in prefixes:
            return k
    return 0


def _chars_for(buf: str, n: int, nonspace: bool) -> int:
    """The fewest characters at the end of ``buf`` whose folds hold ``n`` folded characters
    (non-space ones when ``nonspace``), with the characters that fold to nothing before them."""
    i, got = len(buf), 0
    while i > 0 and got < n:
        i -= 1
        f = FOLD[ord(buf[i])]
        got += len(drop_spaces(f)) if nonspace else len(f)
    return len(buf) - i


class StreamFilter:
    """Filter text that arrives in pieces. ``feed`` returns what may be emitted now; ``flush``
    the held-back rest at the end. ``hits`` counts matches; with block, the caller stops at the
    first (the matched word itself is never emitted: it is still in the held-back tail)."""

    __slots__ = ("f", "buf", "base", "pending", "hits", "masked")

    def __init__(self, f: WordFilter):
        self.f = f
        self.buf = ""  # text seen but not yet emitted
        self.base = 0  # stream offset of buf[0]
        self.pending: list[tuple[int, int]] = []  # matches (stream offsets) reaching into buf
        self.hits = 0
        # spans (stream offsets) emitted as the mask, for logprobs.LogprobGuard (which prunes it)
        self.masked: list[tuple[int, int]] = []

    def passes(self, text: str) -> bool:
        """Take ``text`` as emitted unchanged if nothing is held and it neither matches nor ends
        in the start of a word (the common token); False, taking nothing, otherwise."""
        if self.buf or self.pending or not text.isascii() or not self.f.clean_ascii(text):
            return False
        self.base += len(text)
        return True

    def feed(self, text: str) -> str:
        if self.passes(text):  # ~1 us instead of ~5 through _emit
            return text
        self.buf += text
        return self._emit(len(self.buf) - self._prefix_len())

    def _prefix_len(self) -> int:
        """Length of the tail of buf that folds to the start of a word: all that must be held
        back (a word that ends later starts inside it). Usually 0 or 1, so the filter delays
        text by a few characters at most, not by ``max_word_len - 1``."""
        return self.f.held_tail(self.buf)

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
            if not self.masked or self.masked[-1] != (s, e):
                self.masked.append((s, e))
            pos = max(pos, min(e, end))
        if pos < end:
            parts.append(self.buf[pos - self.base:cut])
        self.pending = [(s, e) for s, e in spans if e > end]
        self.buf, self.base = self.buf[cut:], end
        return "".join(parts)


# ---- long texts: matched in a worker process ------------------------------------------------
_WORKER: WordFilter | None = None


def _worker_init(paths: list[str], mask: str, cjk_ignore_spaces: bool) -> None:
    global _WORKER
    _WORKER = WordFilter.from_files(paths, mask, cjk_ignore_spaces)


def _worker_hits(text: str) -> bool:
    return _WORKER.hits(text)


def _worker_mask(texts: list[str]) -> tuple[list[str], int]:
    return _mask_with(_WORKER, texts)


def _mask_with(f: WordFilter, texts: list[str]) -> tuple[list[str], int]:
    out, total = [], 0
    for t in texts:
        t, n = f.apply_mask(t)
        out.append(t)
        total += n
    return out, total


class FilterWorker:
    """The same word lists in one worker process, for prompts too long to match on the event loop.
    A thread would not do: folding and matching are long C calls (re, str.translate, the automaton)
    that hold the GIL, so a 2 MB prompt held the loop (and /health) for 0.15-0.5 s either way.
    Started on the first long prompt (a gateway that never sees one runs no extra process); the
    event loop only forks it, and the request waits for it without blocking the loop. Texts
    travel by pickling (~2 ms for 2 MB)."""

    def __init__(self, local: WordFilter, paths: list[str], mask: str, cjk_ignore_spaces: bool):
        self.local = local  # the fallback, in a thread, where no process can be started
        self.args = (list(paths), mask, cjk_ignore_spaces)
        self._pool = None
        self.failed = False

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fork of a process running an event loop and threads is unsafe
            self._pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _worker_init, self.args)
        return self._pool

    def _fail(self, err: Exception) -> None:
        """No process (e.g. a script without a ``__main__`` guard cannot spawn): use a thread."""
        self.failed = True
        self.close()
        log.warning("no filter worker process (%s: %s); long prompts are matched in a thread",
                    type(err).__name__, err)

    async def _run(self, fn, local_fn, arg):
        import asyncio
        from concurrent.futures import BrokenExecutor

        if not self.failed:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, arg)
            except (BrokenExecutor, OSError) as err:
                self._fail(err)
        return await asyncio.to_thread(local_fn, arg)

    async def hits(self, text: str) -> bool:
        return await self._run(_worker_hits, self.local.hits, text)

    async def mask(self, texts: list[str]) -> tuple[list[str], int]:
        return await self._run(_worker_mask, lambda t: _mask_with(self.local, t), texts)

    def close(self, wait: bool = False) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=wait, cancel_futures=True)
