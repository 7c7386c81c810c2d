"""The physical limit beside a speed figure: the lowest TPOT the GPU's memory bandwidth allows,
and the lowest prefill time its peak FLOPs allow, for a model shape in a precision.

    python -c "from workbench import roofline as r; s = r.Shape.from_config(r.read_json('data/shapes/llama-3.1-8b.json')); \
               print(r.decode_floor_ms(s, 'bf16', r.gpu('NVIDIA H100 80GB HBM3'), batch=1, context=320))"

Decode: each step reads every weight once, and the KV cache of every running sequence, to make one
token per sequence. So a step takes at least (weight bytes + batch x context x KV bytes per token)
/ bandwidth, and no less than its FLOPs (2 x parameters x batch) / peak. The measured TPOT as a
fraction of that floor is how close the serving stack came (1.0 = at the limit).

Prefill: 2 x parameters x prompt tokens (plus attention's 2 x layers x prompt^2 x hidden, small
below a few thousand tokens) / peak. The fraction of TTFT at low load it explains.

What the floor leaves out, on purpose: activations, the embedding lookup (a row per token), the
sampler, the scheduler and the API's host work. A fraction far below 1 says where the time goes
is not the kernels' bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth_bytes_per_s: float
    bf16_flops: float  # dense, no sparsity
    fp8_flops: float
    source: str


# Dense (no sparsity) tensor-core peaks and HBM bandwidth from the vendors' data sheets.
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("H100 SXM", 3.35e12, 989.4e12, 1978.9e12,
        "NVIDIA H100 Tensor Core GPU datasheet (2023): H100 SXM 3.35 TB/s HBM3, BF16 1,979 TFLOPS "
        "and FP8 3,958 TFLOPS with sparsity (half without)"),
    GPU("H100 PCIe", 2.0e12, 756.0e12, 1513.0e12,
        "NVIDIA H100 Tensor Core GPU datasheet (2023): H100 PCIe 2 TB/s, BF16 1,513 / FP8 3,026 TFLOPS with sparsity"),
    GPU("H100 NVL", 3.9e12, 835.5e12, 1670.5e12,
        "NVIDIA H100 Tensor Core GPU datasheet (2023): H100 NVL 3.9 TB/s, BF16 1,671 / FP8 3,341 TFLOPS with sparsity"),
    GPU("H200", 4.8e12, 989.4e12, 1978.9e12,
        "NVIDIA H200 Tensor Core GPU datasheet (2024): H200 SXM 4.8 TB/s HBM3e, BF16 1,979 / FP8 3,958 TFLOPS "
        "with sparsity"),
    GPU("A100 SXM", 2.039e12, 312e12, 0.0,
        "NVIDIA A100 Tensor Core GPU datasheet (2021): A100 80GB SXM 2,039 GB/s, BF16 312 TFLOPS dense; no FP8"),
    GPU("L40S", 0.864e12, 362.05e12, 733e12,
        "NVIDIA L40S datasheet (2023): 864 GB/s, BF16 362 / FP8 733 TFLOPS dense"),
)}


def gpu(device_name: str) -> GPU | None:
    """The table's GPU for a device name as nvidia-smi or torch reports it (``NVIDIA H100 80GB
    HBM3`` is an H100 SXM); None where the table has none (the report then gives no roofline)."""
    n = device_name.upper()
    if "H200" in n:
        return GPUS["H200"]
    if "H100" in n:
        return GPUS["H100 NVL"] if "NVL" in n else GPUS["H100 PCIe"] if "PCIE" in n else GPUS["H100 SXM"]
    if "A100" in n:
        return GPUS["A100 SXM"]
    if "L40S" in n:
        return GPUS["L40S"]
    return None


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def linear_params(self) -> int:
        """The transformer blocks' projections (what AWQ / GPTQ / FP8 quantize)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        return self.layers * per_layer

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden  # read every step, tied or not; kept in 16 bits by every format

    @property
    def params(self) -> int:
        """Every parameter (norms aside): blocks, embedding, and the LM head unless tied."""
        return self.linear_params + self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


# Bytes per quantized weight: the value plus its group's scale (and zero point), groups of 128.
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "awq-int4": 0.5 + (2 + 0.5) / 128, "gptq-int4": 0.5 + 2 / 128}


def weight_bytes_per_step(s: Shape, precision: str) -> float:
    """Weight bytes a decode step reads: the quantized blocks plus the 16-bit LM head."""
    return s.linear_params * BYTES_PER_WEIGHT[precision] + s.lm_head_params * 2.0


def peak_flops(g: GPU, precision: str) -> float:
    return g.fp8_flops if precision == "fp8" and g.fp8_flops else g.bf16_flops  # W4A16 computes in bf16


def decode_floor_ms(s: Shape, precision: str, g: GPU, batch: float, context: float) -> float:
    """The lowest time per output token at ``batch`` sequences of mean ``context`` tokens."""
    batch = max(float(batch), 1.0)
    mem = (weight_bytes_per_step(s, precision) + batch * context * s.kv_bytes_per_token) / g.bandwidth_bytes_per_s
    compute = 2.0 * (s.linear_params + s.lm_head_params) * batch / peak_flops(g, precision)
    return 1000.0 * max(mem, compute)


def prefill_floor_ms(s: Shape, precision: str, g: GPU, prompt_tokens: float) -> float:
    """The lowest time to prefill one prompt (compute-bound) - or to read the weights once, if longer."""
    flops = 2.0 * (s.linear_params + s.lm_head_params) * prompt_tokens \
        + 2.0 * s.layers * prompt_tokens ** 2 * s.heads * s.head_dim
    read = weight_bytes_per_step(s, precision) / g.bandwidth_bytes_per_s
    return 1000.0 * max(flops / peak_flops(g, precision), read)


def fraction(floor_ms: float, measured_ms: float | None) -> float | None:
    """floor / measured: 1.0 at the hardware's limit; None without a measurement."""
    if measured_ms is None or not math.isfinite(measured_ms) or measured_ms <= 0:
        return None
    return floor_ms / measured_ms
