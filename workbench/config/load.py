"""The load test's sub-sections: what it sends (``workload``), what a request and a step must meet
(``slo``), how the knee is searched (``knee``), and when a step counts as steady (``steady_state``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workbench.config.base import Section


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
