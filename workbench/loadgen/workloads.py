"""Workloads: the prompts a load test sends, each with its output-token target.

    specs = load(cfg.workload, np.random.default_rng(cfg.seed))   # once per run
    step = sample(specs, n, np.random.default_rng([seed, step, repeat]))   # each step's n requests

A registry keyed by kind (``WORKLOADS``), each ``load(cfg, rng) -> Workload``. Generated kinds
(``sharegpt-shaped`` - the default -, ``shared-prefix``, ``long-context``, ``synthetic``; see
workbench/loadgen/synth.py) make a unique prompt for every request of a step from the step's
generator; file kinds return their prompts, re-sampled by ``sample``:

- ``sharegpt``: a JSON list of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}`` (or ``{"data": [...]}``). The first human turn is the
  prompt; the gpt turn after it sets the output target, as vLLM's ShareGPT sampler does.
- ``jsonl``: one ``{"prompt": ..., "max_tokens": ...}`` per line (``max_tokens`` optional).

Token counts are APPROXIMATE, because the load generator loads no tokenizer (it must start in
milliseconds and know nothing of the model): one token per CJK character, 4/3 per other word
(~ a BPE tokenizer on English), and one word per token for synthetic prompts. They only choose
targets; the metrics use the server's own ``usage`` counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workbench.config import WorkloadConfig
from workbench.loadgen import synth

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
# Short common words: each is one token in the Llama / GPT-2 / SmolLM BPE vocabularies.
_WORDS = ("the of and to in is it you that he was for on are with as his they be at one have this "
          "from or had by word but what some we can out other were all there when up use your how "
          "said an each she which do their time if will way about many then them write would like "
          "so these her long make thing see him two has look more day could go come did number "
          "sound no most people my over know water than call first who may down side been now "
          "find any new work part take get place made live where after back little only round "
          "man year came show every good me give our under name very through just form sentence "
          "great think say help low line differ turn cause much mean before move right boy old "
          "too same tell does set three want air well also play small end put home read hand "
          "port large spell add even land here must big high such follow act why ask men change "
          "went light kind off need house picture try us again animal point mother world near "
          "build self earth father head stand own page should country found answer school grow "
          "study still learn plant cover food sun four between state keep eye never last let "
          "thought city tree cross farm hard start might story saw far sea draw left late run "
          "while press close night real life few north open seem together next white children "
          "begin got walk example ease paper group always music those both mark often letter "
          "until mile river car feet care second book carry took science eat room friend began "
          "idea fish mountain stop once base hear horse cut sure watch color face wood main").split()


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    max_tokens: int  # output-token target sent as max_tokens
    prompt_tokens_est: int  # approximate; the server's usage.prompt_tokens is what is reported


def approx_tokens(text: str) -> int:
    """Approximate token count without a tokenizer (see the module docstring)."""
    cjk = len(_CJK.findall(text))
    words = len(_CJK.sub(" ", text).split())
    return max(1, cjk + round(words * 4 / 3))


def _cap(target: int, cfg: WorkloadConfig) -> int:
    return max(1, min(target, cfg.max_tokens) if cfg.max_tokens else target)


def _sharegpt(cfg: WorkloadConfig, rng: np.random.Generator) -> list[RequestSpec]:
    data = json.loads(Path(_path(cfg)).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("data") or data.get("conversations") or []
    specs = []
    for item in data:
        turns = item.get("conversations") or []
        for i, turn in enumerate(turns[:-1]):
            if turn.get("from") == "human" and turns[i + 1].get("from") == "gpt":
                prompt = turn["value"]
                specs.append(RequestSpec(prompt, _cap(approx_tokens(turns[i + 1]["value"]), cfg),
                                         approx_tokens(prompt)))
                break
    return specs


def _jsonl(cfg: WorkloadConfig, rng: np.random.Generator) -> list[RequestSpec]:
    specs = []
    for n, line in enumerate(Path(_path(cfg)).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{cfg.path}:{n}: a JSONL workload line needs a 'prompt'")
        target = int(row.get("max_tokens") or cfg.output_tokens)
        specs.append(RequestSpec(row["prompt"], _cap(target, cfg), approx_tokens(row["prompt"])))
    return specs


def _path(cfg: WorkloadConfig) -> str:
    if not cfg.path:
        raise ValueError(f"workload kind {cfg.kind!r} needs a path")
    return cfg.path


Workload = list[RequestSpec] | synth.Generated

WORKLOADS: dict[str, Callable[[WorkloadConfig, np.random.Generator], Workload]] = {
    "sharegpt": _sharegpt, "jsonl": _jsonl, "sharegpt-shaped": synth.load, "shared-prefix": synth.load,
    "long-context": synth.load, "synthetic": synth.load,
}


def load(cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    specs = WORKLOADS[cfg.kind](cfg, rng)
    if not isinstance(specs, synth.Generated) and not specs:
        raise ValueError(f"workload {cfg.kind} {cfg.path or ''} holds no usable prompts")
    return specs


def sample(specs: Workload, n: int, rng: np.random.Generator) -> list[RequestSpec]:
    """A step's ``n`` requests, deterministic in ``rng``'s state (seed it by (seed, step, repeat)
    and every arm at that step gets the same requests). A generated workload makes ``n`` new
    prompts; a file's prompts are shuffled and repeated as often as needed."""
    if isinstance(specs, synth.Generated):
        return specs.draw(n, rng)
    out: list[RequestSpec] = []
    while len(out) < n:
        out.extend(specs[i] for i in rng.permutation(len(specs)))
    return out[:n]
