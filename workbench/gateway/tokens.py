"""Prompt tokens at admission: every prompt form counted, exactly where the gateway can, else bounded.

A key with a token limit reserves prompt + max_tokens before the request goes upstream (app.py),
so the prompt count decides how far concurrent requests can overdraw the key. Forms:

- **token IDs** (``prompt`` / ``input`` as a list of integers): their number, exactly.
- **text** (strings anywhere in the prompt: content, text parts, names, tool calls, reasoning,
  tool schemas, ``suffix``): the model's own tokenizer when ``upstreams.<name>.tokenizer`` names
  its ``tokenizer.json`` (HF ``tokenizers``, Rust, no torch: ~2 us per 100 tokens); otherwise an
  upper bound, the UTF-8 bytes + 1 per string: a byte-level BPE token holds at least one byte,
  and a SentencePiece one at least one character (with its byte fallback, at least one byte),
  plus at most one added prefix-space piece per string.
- **media parts** (image / audio / video / file): ``limits.media_part_tokens`` each, a stated
  bound (vLLM counts a model-dependent number of placeholder tokens per item).
- **chat framing**: the template's role markers and default system prompt, which no part of the
  request carries: ``limits.template_tokens`` per request + ``limits.message_tokens`` per message.

``count`` returns (tokens, exact); ``exact`` is True when no text was bounded rather than counted,
so a request whose prompt alone is larger than a key's per-minute budget can be refused outright
(it could never fit) rather than admitted at a capped reservation.

    python -c "from workbench.gateway.tokens import load_tokenizer; print(load_tokenizer('models/base'))"
"""

from __future__ import annotations

import logging
from pathlib import Path

from workbench.gateway.sse import dumps

log = logging.getLogger(__name__)
_MEDIA_KEYS = ("image_url", "input_audio", "audio_url", "video_url", "file", "image", "audio", "video")
# A text this long is tokenized off the event loop (asyncio.to_thread in app.py): ~64 KB costs
# ~3 ms with tokenizers, past which other requests would feel it.
OFF_LOOP_CHARS = 65536


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json, or a model folder holding one."""
    from tokenizers import Tokenizer  # Rust; imports in ~20 ms, no torch or transformers

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    tok = Tokenizer.from_file(str(p))
    tok.no_truncation()  # a tokenizer.json may carry the model's truncation: count every token
    tok.no_padding()
    return tok


def _strings(obj, out: list[str]) -> None:
    """Every string value and key under ``obj`` (tool schemas, arguments), in order."""
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.append(k)
            _strings(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _strings(v, out)


class PromptCounter:
    """Counts one upstream's prompts: its tokenizer if configured, else the byte bound."""

    def __init__(self, tokenizer=None, media_part_tokens: int = 4096, template_tokens: int = 32,
                 message_tokens: int = 8):
        self.tokenizer = tokenizer
        self.media, self.template, self.message = media_part_tokens, template_tokens, message_tokens

    def texts(self, route: str, req: dict) -> tuple[list[str], int, int]:
        """(prompt strings, tokens counted without them, media parts)."""
        texts: list[str] = []
        fixed = media = 0
        if route == "chat":
            fixed = self.template + self.message * len(req["messages"])
            for m in req["messages"]:
                for k, v in m.items():
                    if k == "role":
                        continue
                    if k == "content" and isinstance(v, list):
                        for part in v:
                            if not isinstance(part, dict):
                                continue
                            if any(mk in part for mk in _MEDIA_KEYS):
                                media += 1
                            elif isinstance(part.get("text"), str):
                                texts.append(part["text"])
                    elif isinstance(v, str):
                        texts.append(v)
                    elif v is not None:
                        texts.append(dumps(v).decode())  # tool_calls etc., as the template renders them
            for extra in ("tools", "functions", "response_format"):
                if req.get(extra):
                    texts.append(dumps(req[extra]).decode())
        else:
            v = req["prompt" if route == "completions" else "input"]
            if isinstance(v, str):
                texts.append(v)
            else:  # a list: strings (a batch) or token IDs (one prompt)
                for x in v:
                    if isinstance(x, str):
                        texts.append(x)
                    else:
                        fixed += 1
            if isinstance(req.get("suffix"), str):
                texts.append(req["suffix"])
        return texts, fixed, media

    def count_texts(self, texts: list[str]) -> tuple[int, bool]:
        texts = [t for t in texts if t]
        if not texts:
            return 0, True
        if self.tokenizer is None:
            return sum(len(t.encode("utf-8", "replace")) + 1 for t in texts), False
        return sum(len(e) for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)), True

    def count(self, route: str, req: dict) -> tuple[int, bool]:
        texts, fixed, media = self.texts(route, req)
        n, exact = self.count_texts(texts)
        return n + fixed + media * self.media, exact

    def detokenize(self, ids: list[int]) -> str | None:
        """The text of a token-ID prompt (for the filter), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=False)
