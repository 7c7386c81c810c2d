"""Read AutoAWQ "GEMM" checkpoints without AutoAWQ: unpack, dequantize, or load into transformers.

    python -m workbench.quantize.awq_format models/autoawq-int4 --compare models/base   # per-layer errors

transformers asks for ``gptqmodel`` to load an AWQ folder and AutoAWQ's own CPU inference needs
intel-extension-for-pytorch (torch 2.6-2.8 only), so neither runs here. The format is small enough
to read directly (AutoAWQ ``awq/modules/linear/gemm.py``, ``WQLinear_GEMM.from_linear``):

- ``qweight`` (in, out/8) int32: the 4-bit codes of W^T, eight output columns per int32, nibble i
  holding column ``AWQ_ORDER[i]`` of its block of eight;
- ``qzeros`` (in/group, out/8) int32: the zero points, packed the same way;
- ``scales`` (in/group, out) float16/32;
- W[o, i] = (q[i, o] - z[i // group, o]) * s[i // group, o].

The same unpacking is what vLLM does before its CPU kernel (``_REVERSE_AWQ_PACK_ORDER`` in
``vllm/model_executor/layers/quantization/auto_awq.py``), so this is an independent reference for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ packs column AWQ_ORDER[i] into nibble i
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble that holds column c


def unpack_awq(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(rows, cols/8) int32 in AWQ order -> (rows, cols) int32 codes in column order."""
    if bits != 4:
        raise ValueError(f"AutoAWQ GEMM packs 4-bit codes only, got bits={bits}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (rows, cols/8, 8), nibble order
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_awq` (for tests): (rows, cols) codes -> (rows, cols/8) int32."""
    rows, cols = codes.shape
    blocks = codes.to(torch.int32).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (blocks << shifts).sum(-1, dtype=torch.int32)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """The float weight (out, in) of one AWQ GEMM linear."""
    q = unpack_awq(qweight).float()  # (in, out)
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, dim=0)  # (in, out)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z) * s).t().contiguous()


def dequantized_state_dict(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of an AWQ folder, with each quantized linear replaced by its float ``weight``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qcfg.get("group_size") or qcfg["q_group_size"]
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw.update(load_file(f))
    out = {}
    for name, t in raw.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            out[f"{prefix}.weight"] = dequantize(t, raw[f"{prefix}.qzeros"], raw[f"{prefix}.scales"],
                                                 group).to(dtype)
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def load_dequantized(folder: Path, dtype: torch.dtype = torch.float32):
    """A plain transformers model holding the AWQ folder's dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dequantized_state_dict(folder, dtype), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def compare_with_base(folder: Path, base: Path) -> dict[str, float]:
    """Relative Frobenius error ||W_awq - W_base|| / ||W_base|| per quantized linear.

    AWQ folds a per-channel scale into the preceding norm (q/k/v, gate/up) or linear (down via up),
    so raw per-layer errors mix quantization error with that rescaling; the forward pass
    (perplexity, a generation) is the honest check. Layers with no rescaling (o_proj under GQA,
    whose previous op v_proj has another shape) show the pure quantization error.
    """
    from safetensors.torch import load_file

    deq = dequantized_state_dict(folder)
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(Path(base).glob("*.safetensors")):
        ref.update(load_file(f))
    return {k: ((deq[k] - ref[k].float()).norm() / ref[k].float().norm()).item()
            for k in deq if k.endswith("proj.weight") and k in ref}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--compare", type=Path, help="base folder: print per-layer relative errors")
    args = p.parse_args(argv)
    if args.compare:
        for name, err in compare_with_base(args.folder, args.compare).items():
            print(f"{err:8.4f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
