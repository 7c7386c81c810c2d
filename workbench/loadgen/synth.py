"""Generated workloads: prompts made on demand, one per request, from a seed.

Kinds (``loadtest.workload.kind``), registered in ``workloads.WORKLOADS``:

- ``sharegpt-shaped``: chat traffic with prompt and reply lengths drawn from log-normal
  distributions whose means are ShareGPT's, as published in the vLLM paper (Kwon et al., SOSP
  2023, section 6.1 / Fig. 11: ShareGPT prompts average 161.31 tokens and replies 337.99, 8.4x and
  5.8x Alpaca's 19.31 and 58.45). The paper gives means and histograms, not a fitted shape: a
  log-normal with ``prompt_sigma`` 1.0 (prompts are heavy-tailed: many one-liners, some pasted
  documents) and ``reply_sigma`` 0.8 (replies cluster at a few hundred tokens) is our assumption;
  set the four numbers to match another trace. ``length_scale`` shrinks both means for a small
  machine (the CPU default: 0.1), and ``max_input_tokens`` / ``max_tokens`` cap the tails.
- ``shared-prefix``: the same, with every ``prefix_group_size`` consecutive requests opening with
  one shared preamble of ``prefix_tokens`` tokens (a system prompt, a shared document): the
  prefix cache's best case, to set beside the unique default.
- ``long-context``: prompts of exactly ``long_context_tokens`` tokens (the issue's 32k on a GPU; a
  scaled value on the CPU, which serves 2,048 tokens of context), replies as ``sharegpt-shaped``.
- ``synthetic``: prompts of ``input_tokens``, replies of ``output_tokens``, fixed.

Every request gets its own prompt (``unique``, the default): text derived from a per-step nonce
and the request's index, opening with a three-word tag that differs for every index of a step, so
vLLM's prefix cache cannot serve one request from another's prompt (the chat template's own
preamble, the same in every request, is still cached: the measured hit rate says how much).
The nonce is drawn from the step's generator, seeded by (seed, step, repeat) in the runner, so
every arm at one (step, repeat) is sent identical requests. ``unique: false`` draws a pool of 256
prompts once and re-samples it, as the load generator did before (issue 27, finding 3).

Words are short common English words, each one token in the Llama / GPT-2 / SmolLM vocabularies
(``workloads._WORDS``), so a prompt of n words is ~n tokens; the server's ``usage`` counts are
what the metrics report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workbench.config import WorkloadConfig

POOL = 256  # unique: false - distinct prompts re-sampled (the old synthetic workload's count)
TAG_WORDS = 3  # words of the per-request tag: len(_WORDS) ** 3 distinct values per step
MIN_PROMPT_TOKENS = TAG_WORDS + 1


def _words():
    from workbench.loadgen.workloads import _WORDS  # one home of the vocabulary

    return _WORDS


def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, n: int, lo: int,
                      hi: int | None) -> np.ndarray:
    """``n`` integer lengths from a log-normal of the given MEAN (not median: mu = ln(mean) -
    sigma^2 / 2) and log-sd ``sigma``, rounded and clipped to [lo, hi]."""
    mu = math.log(mean) - sigma ** 2 / 2
    out = np.rint(rng.lognormal(mu, sigma, size=n)).astype(int)
    return np.clip(out, lo, hi if hi is not None else None)


@dataclass(frozen=True)
class Generated:
    """A generated workload: ``draw(n, rng)`` makes a step's ``n`` requests (``workloads.sample``
    calls it), deterministic in ``rng``'s state."""

    cfg: WorkloadConfig
    pool: tuple = ()  # unique: false - the fixed prompts drawn once by ``load``

    def draw(self, n: int, rng: np.random.Generator):
        if self.pool:
            return [self.pool[i] for i in rng.integers(len(self.pool), size=n)]
        return make(self.cfg, n, int(rng.integers(2 ** 62)))


def _text(rng: np.random.Generator, n: int) -> str:
    words = _words()
    return " ".join(words[w] for w in rng.integers(len(words), size=max(0, n)))


def _tag(value: int) -> str:
    words = _words()
    k = len(words)
    return " ".join(words[(value // k ** j) % k] for j in range(TAG_WORDS))


def _lengths(cfg: WorkloadConfig, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, reply tokens) for ``n`` requests of ``cfg.kind``."""
    s = cfg.length_scale
    cap_in = cfg.max_input_tokens
    if cfg.kind == "synthetic":
        prompts = np.full(n, cfg.input_tokens)
        replies = np.full(n, cfg.output_tokens)
    else:
        replies = lognormal_lengths(rng, cfg.reply_mean_tokens * s, cfg.reply_sigma, n, 1, None)
        if cfg.kind == "long-context":
            prompts = np.full(n, cfg.long_context_tokens)
        else:
            prompts = lognormal_lengths(rng, cfg.prompt_mean_tokens * s, cfg.prompt_sigma, n,
                                        MIN_PROMPT_TOKENS, None)
    if cap_in is not None and cfg.kind != "long-context":  # long-context: its length is the point
        prompts = np.minimum(prompts, cap_in)
    if cfg.max_tokens is not None:
        replies = np.minimum(replies, cfg.max_tokens)
    return np.maximum(prompts, MIN_PROMPT_TOKENS), np.maximum(replies, 1)


def make(cfg: WorkloadConfig, n: int, nonce: int):
    """``n`` requests with unique prompts: request i's text comes from (nonce, i) alone."""
    from workbench.loadgen.workloads import RequestSpec

    prompts, replies = _lengths(cfg, np.random.default_rng([nonce, 2 ** 32]), n)
    k = len(_words())
    base = nonce % k ** TAG_WORDS
    out = []
    for i in range(n):
        rng = np.random.default_rng([nonce, i])
        tag = _tag((base + i) % k ** TAG_WORDS)  # distinct for every i < k^3 (~64 M) of a step
        body_tokens = int(prompts[i]) - TAG_WORDS
        prefix = ""
        if cfg.kind == "shared-prefix":
            group = i // cfg.prefix_group_size
            prefix = _text(np.random.default_rng([nonce, group, 1]), cfg.prefix_tokens) + "\n\n"
        text = prefix + tag + (" " + _text(rng, body_tokens) if body_tokens > 0 else "")
        est = int(prompts[i]) + (cfg.prefix_tokens if prefix else 0)
        out.append(RequestSpec(text, int(replies[i]), est))
    return out


def load(cfg: WorkloadConfig, rng: np.random.Generator) -> Generated:
    if cfg.unique:
        return Generated(cfg)
    return Generated(cfg, tuple(make(cfg, POOL, int(rng.integers(2 ** 62)))))
