"""Shape-only models: a model's ``config.json`` and tokenizer, no weights, for vLLM to serve with
random weights (``--load-format dummy``) in one precision. Speed only (issue 32).

A kernel's speed does not depend on the values it multiplies, so an 8B shape measures what an 8B
model's decode and prefill cost on a GPU without 16 GB of weights. What random weights cannot
show: MoE routing (random routers spread tokens unlike trained ones) and anything that depends on
the text (EOS, speculative decoding): the load test fixes reply lengths (``ignore_eos``).

    python -c "from workbench import shapes; print(shapes.build('data/shapes/llama-3.1-8b.json', 'awq-int4', 'runs/speed/models/x'))"

Precisions and the kernels vLLM picks for them on a Hopper GPU:

- ``bf16``: the checkpoint dtype, cuBLAS GEMMs;
- ``fp8``: vLLM's online FP8 (``--quantization fp8``): weights cast to FP8 E4M3 with a scale per
  tensor at load, activations scaled per token at run time (CUTLASS FP8 GEMMs);
- ``awq-int4``: AWQ's ``quantization_config`` (4 bits, groups of 128, zero points, GEMM format):
  vLLM upgrades it to ``awq_marlin`` (the Marlin W4A16 kernel);
- ``gptq-int4``: GPTQ's (4 bits, groups of 128, symmetric, no act-order): ``gptq_marlin``, which
  picks the Machete kernel on Hopper (``choose_mp_linear_kernel``), Marlin elsewhere.

The tokenizer: ``llama3`` builds Llama 3's (128,000 BPE ranks from the ``llama-models`` package,
plus its 256 special tokens) as a Hugging Face ``tokenizer.json``; or a folder holding one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp8", "awq-int4", "gptq-int4")
# The linear layers GPTQ quantizes, named as vLLM matches them (a substring of each layer's prefix).
# Written out because a dummy-weight folder has no safetensors for vLLM to read them from: vLLM
# 0.26 then took an empty list as "no layer quantized" and loaded 16-bit weights (15.0 GiB on an
# H100, results/gpu-3); a flat list, since 0.26 matches strings only (later versions flatten).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 128  # the published AWQ / GPTQ checkpoints of Llama 3.1 (e.g. hugging-quants) use 128
QUANT_CONFIG = {
    "awq-int4": {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
                 "version": "gemm", "modules_to_not_convert": None},
    "gptq-int4": {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": False,
                  "sym": True, "damp_percent": 0.01, "checkpoint_format": "gptq",
                  "modules_in_block_to_quantize": list(LINEAR_MODULES)},
}
SERVER_QUANTIZATION = {"fp8": "fp8"}  # vLLM --quantization; None: read from the config

# Llama 3's tokenizer (llama_models/llama3/tokenizer.py): the split pattern and the special tokens
# after the 128,000 ranks, in id order (128000 ...).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


class ShapeError(ValueError):
    """A shape or precision that cannot be built, with the reason."""


def read_shape(path: str | Path) -> dict:
    """The shape's Hugging Face config, less the ``_``-prefixed notes (``_source``)."""
    p = Path(path)
    if not p.is_file():
        raise ShapeError(f"shape config {p} not found")
    cfg = json.loads(p.read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in cfg:
            raise ShapeError(f"shape config {p} has no '{key}'")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def model_config(shape: dict, precision: str) -> dict:
    """The ``config.json`` served for ``precision``: the shape, with the 4-bit formats'
    ``quantization_config``."""
    if precision not in PRECISIONS:
        raise ShapeError(f"unknown precision '{precision}' (one of {', '.join(PRECISIONS)})")
    cfg = dict(shape)
    cfg.pop("quantization_config", None)
    if precision in QUANT_CONFIG:
        cfg["quantization_config"] = dict(QUANT_CONFIG[precision])
    return cfg


def _llama3_ranks() -> Path:
    from importlib import resources

    try:
        path = resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError:
        raise ShapeError("tokenizer 'llama3' needs the llama-models package (requirements/*.lock); "
                         "run ./setup.sh") from None
    return Path(str(path))


def llama3_tokenizer(cache_dir: Path) -> Path:
    """Llama 3's tokenizer as ``tokenizer.json`` (built once into ``cache_dir``, ~5 s)."""
    ranks = _llama3_ranks()
    digest = hashlib.sha256(ranks.read_bytes()).hexdigest()[:12]
    out = cache_dir / f"llama3-{digest}" / "tokenizer.json"
    if out.is_file():
        return out
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks), pattern=LLAMA3_PATTERN,
                            extra_special_tokens=LLAMA3_SPECIAL).converted()
    if tok.get_vocab_size() != 128256:
        raise ShapeError(f"Llama 3 tokenizer built with {tok.get_vocab_size()} tokens, not 128256")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tokenizer.json.partial")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return out


def tokenizer_files(tokenizer: str, cache_dir: Path) -> dict[str, Path | dict]:
    """{file name: source path, or the JSON to write} for the model folder."""
    if tokenizer == "llama3":
        special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "pad_token": "<|finetune_right_pad_id|>"}
        return {"tokenizer.json": llama3_tokenizer(cache_dir),
                "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                          "model_max_length": 131072, "chat_template": LLAMA3_CHAT_TEMPLATE,
                                          "clean_up_tokenization_spaces": True, **special},
                "special_tokens_map.json": special}
    folder = Path(tokenizer)
    files = {p.name: p for p in folder.glob("*") if p.name.startswith(("tokenizer", "special_tokens"))
             or p.name in ("vocab.json", "merges.txt", "chat_template.jinja")}
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise ShapeError(f"tokenizer '{tokenizer}': neither 'llama3' nor a folder with tokenizer files")
    return files


def build(shape_path: str | Path, precision: str, out_dir: str | Path, tokenizer: str = "llama3",
          cache_dir: str | Path = "runs/speed/cache") -> Path:
    """Write the model folder for ``precision`` of the shape (config, generation config,
    tokenizer) into ``out_dir``, whole or not at all; returns it."""
    shape = read_shape(shape_path)
    cfg = model_config(shape, precision)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"), "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1))
    for name, src in tokenizer_files(tokenizer, Path(cache_dir)).items():
        if isinstance(src, dict):
            (tmp / name).write_text(json.dumps(src, indent=1))
        else:
            shutil.copyfile(src, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("shape %s in %s: %s", Path(shape_path).name, precision, out)
    return out


def server_overrides(model_dir: str | Path, precision: str) -> dict:
    """The ``serve.chat`` keys that serve the folder with random weights in ``precision``."""
    return {"model_dir": str(model_dir), "load_format": "dummy", "quantization": SERVER_QUANTIZATION.get(precision)}
