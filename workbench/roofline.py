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

Several GPUs (issue 33), a ``Split`` of TP x PP:

- **TP = t**: every weight and the KV cache are split over t GPUs that read at once, so the memory
  term is divided by t (the KV cache by min(t, KV heads): vLLM replicates a KV head that TP cuts
  finer than the heads), and the compute term by t. Left out: TP's two all-reduces per layer, which
  at small batch are latency-bound (tens of microseconds each over NVLink, 64 a token for 32
  layers): a TP arm's fraction below TP=1's is largely that time.
- **PP = p**: a token passes the p stages in turn, each reading its 1/p of the weights, so the
  weight term is *not* divided by p: one sequence gains nothing. With at least p sequences in
  flight the stages work at once on different micro-batches, which divides the KV-cache and
  compute terms by min(p, batch) - PP buys throughput and memory, never TPOT. Left out: the
  stage-to-stage send (batch x hidden x 2 bytes) and the bubbles when batches are uneven.
- **MoE**: a step reads the attention, the shared expert and only the experts its tokens were
  routed to. With random routers (dummy weights) each token's top-k is spread about evenly, so a
  batch of B touches E x (1 - (1 - k/E)^B) of E experts per layer; trained routers are skewed and
  touch fewer, so the floor is for this (random) routing, not a trained model's. Compute counts
  k experts per token. Expert parallelism does not change the floor (the same bytes over the same
  GPUs); what it changes - token dispatch instead of an all-reduce, and the busiest GPU's share
  of the experts - is what the measured fraction shows.
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
    # MoE (0 experts: dense): routed experts per layer, experts per token, one expert's width, and
    # the always-on shared expert's width (Qwen-MoE; 0 for Mixtral)
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        """A Hugging Face config: Llama-like, Mixtral (``num_local_experts``, experts as wide as
        ``intermediate_size``) or Qwen-MoE (``num_experts``, ``moe_intermediate_size``,
        ``shared_expert_intermediate_size``; every layer sparse, as Qwen1.5-MoE's decoder_sparse_step 1)."""
        heads = c["num_attention_heads"]
        experts = c.get("num_experts") or c.get("num_local_experts") or 0
        return cls(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)), experts=experts,
                   top_k=c.get("num_experts_per_tok", 0) if experts else 0,
                   expert_intermediate=(c.get("moe_intermediate_size") or c["intermediate_size"]) if experts else 0,
                   shared_intermediate=(c.get("shared_expert_intermediate_size") or 0) if experts else 0)

    @property
    def attention_params(self) -> int:  # one layer's q, k, v, o projections
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h

    @property
    def always_on_mlp_params(self) -> int:
        """One layer's MLP weights every token uses: the dense MLP, or the router and shared expert."""
        if not self.experts:
            return 3 * self.hidden * self.intermediate
        shared = 3 * self.hidden * self.shared_intermediate + (self.hidden if self.shared_intermediate else 0)
        return self.hidden * self.experts + shared

    @property
    def expert_params(self) -> int:  # one routed expert (gate, up, down)
        return 3 * self.hidden * self.expert_intermediate

    @property
    def linear_params(self) -> int:
        """The transformer blocks' projections (what AWQ / GPTQ / FP8 quantize), every expert included."""
        return self.layers * (self.attention_params + self.always_on_mlp_params + self.experts * self.expert_params)

    def experts_touched(self, batch: float) -> float:
        """Expected routed experts a layer reads for ``batch`` tokens routed evenly at random."""
        if not self.experts:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.top_k / self.experts) ** max(float(batch), 1.0))

    def linear_params_read(self, batch: float = 1.0) -> float:
        """Block weights a decode step of ``batch`` tokens reads (all of a dense model's)."""
        if not self.experts:
            return float(self.linear_params)
        return self.layers * (self.attention_params + self.always_on_mlp_params
                              + self.experts_touched(batch) * self.expert_params)

    @property
    def linear_params_per_token(self) -> int:
        """Block weights one token multiplies by (k experts of a MoE): 2 FLOPs each."""
        return self.layers * (self.attention_params + self.always_on_mlp_params + self.top_k * self.expert_params) \
            if self.experts else self.linear_params

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


@dataclass(frozen=True)
class Split:
    """How a server spreads over GPUs: tensor- and pipeline-parallel sizes (config.LayoutConfig)."""

    tp: int = 1
    pp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


ONE_GPU = Split()

# Bytes per quantized weight: the value plus its group's scale (and zero point), groups of 128.
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "awq-int4": 0.5 + (2 + 0.5) / 128, "gptq-int4": 0.5 + 2 / 128}


def weight_bytes_held(s: Shape, precision: str) -> float:
    """Weight bytes the server holds over all its GPUs: every block weight (every expert) in the
    precision, plus the 16-bit LM head (what vLLM's "Model loading took" sums, embedding aside)."""
    return s.linear_params * BYTES_PER_WEIGHT[precision] + s.lm_head_params * 2.0


def weight_bytes_per_step(s: Shape, precision: str, batch: float = 1.0) -> float:
    """Weight bytes a decode step of ``batch`` sequences reads: the quantized blocks (a MoE's
    touched experts only) plus the 16-bit LM head."""
    return s.linear_params_read(batch) * BYTES_PER_WEIGHT[precision] + s.lm_head_params * 2.0


def peak_flops(g: GPU, precision: str) -> float:
    return g.fp8_flops if precision == "fp8" and g.fp8_flops else g.bf16_flops  # W4A16 computes in bf16


def decode_floor_ms(s: Shape, precision: str, g: GPU, batch: float, context: float,
                    split: Split = ONE_GPU) -> float:
    """The lowest time per output token at ``batch`` sequences of mean ``context`` tokens, on
    ``split``'s GPUs (the module's docstring says what TP and PP divide)."""
    batch = max(float(batch), 1.0)
    stages_at_once = min(float(split.pp), batch)  # PP's stages overlap only on separate sequences
    kv_split = min(split.tp, s.kv_heads)  # TP past the KV heads replicates them
    mem = (weight_bytes_per_step(s, precision, batch) / split.tp
           + batch * context * s.kv_bytes_per_token / (kv_split * stages_at_once)) / g.bandwidth_bytes_per_s
    compute = 2.0 * (s.linear_params_per_token + s.lm_head_params) * batch \
        / (peak_flops(g, precision) * split.tp * stages_at_once)
    return 1000.0 * max(mem, compute)


def prefill_floor_ms(s: Shape, precision: str, g: GPU, prompt_tokens: float, split: Split = ONE_GPU) -> float:
    """The lowest time to prefill one prompt (compute-bound) - or to read the weights once, if
    longer - on ``split``'s GPUs: TP divides both; one prompt goes through PP's stages in turn."""
    flops = 2.0 * (s.linear_params_per_token + s.lm_head_params) * prompt_tokens \
        + 2.0 * s.layers * prompt_tokens ** 2 * s.heads * s.head_dim
    read = weight_bytes_per_step(s, precision, prompt_tokens) / g.bandwidth_bytes_per_s
    return 1000.0 * max(flops / peak_flops(g, precision), read) / split.tp


def fraction(floor_ms: float, measured_ms: float | None) -> float | None:
    """floor / measured: 1.0 at the hardware's limit; None without a measurement."""
    if measured_ms is None or not math.isfinite(measured_ms) or measured_ms <= 0:
        return None
    return floor_ms / measured_ms
