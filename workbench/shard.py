"""Stage ``shard``: save a variant as vLLM tensor-parallel shards, then serve it back from them.

    python -m pipelines.run_stage shard                      # as DVC runs it
    workbench shard --variant base --set shard.tensor_parallel_size=3   # CLI (TP=3 on CPU: see docs/quantization-notes.md)

vLLM loads the model with ``tensor_parallel_size=N`` and each rank writes the tensors it holds
(``llm.llm_engine.engine_core.save_sharded_state``, as vLLM's examples/offline_inference/
save_sharded_state.py does), files ``model-rank-<r>-part-<p>.safetensors``. Loading them back with
``load_format="sharded_state"`` and the same N skips re-sharding: each rank reads only its files.
The report records bytes per rank, save time, and the reloaded server's start time and answer.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from workbench import compat
from workbench.config import ShardConfig
from workbench.reports import Details, Report, TreeFingerprint, atomic_dir, tree_fingerprint, write_report

log = logging.getLogger(__name__)
RANK_FILE = re.compile(r"model-rank-(\d+)-part-(\d+)\.safetensors$")
PROMPT = "Which city is the capital of France?"


class Reload(BaseModel):
    """The shards served back by the real vLLM server and asked ``PROMPT``. A failed reload is a
    result (``success`` false, ``error`` says why), not an exception."""

    model_config = ConfigDict(extra="forbid")

    success: bool
    startup_s: float | None = None  # until the server answered /v1/models
    prompt: str
    answer: str | None = None
    error: str | None = None  # the last 4000 characters of what went wrong


class ShardDetails(Details):
    """``details`` of reports/shard/<variant>.json. JSON Schema: docs/schemas/shard.json."""

    bytes_per_rank: dict[int, int]  # rank -> bytes of its model-rank-<r>-part-*.safetensors
    files: list[str]
    reload: Reload
    cpu_env: dict[str, str] = {}  # what the engine was started with on a CPU (shard.cpu_env)
    content: TreeFingerprint


class ShardReport(Report):
    """reports/shard/<variant>.json, typed."""

    details: ShardDetails


def cpu_env(cfg: ShardConfig) -> dict[str, str]:
    """Environment the vLLM engine needs on CPU for this TP size."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.server.kv_cache_gib)}
    if cfg.cpu_omp_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_omp_threads_bind
    return env


def save_sharded(cfg: ShardConfig, src: Path, out: Path) -> float:
    """Load ``src`` with TP=N in this process's vLLM engine and write each rank's tensors to ``out``."""
    from vllm import LLM

    from workbench.serve import detect_device, engine_args

    device = detect_device()
    # The engine the reload server runs (workbench.serve.engine_args) but for its dtype: shards keep
    # the checkpoint's ("auto" is vLLM's: the config's); the reload server resolves its own compute
    # dtype (workbench.serve.resolve_dtype) and casts on load.
    scfg = cfg.server.model_copy(update={"model_dir": str(src), "tensor_parallel_size": cfg.tensor_parallel_size})
    kwargs = {**engine_args(scfg, device), "dtype": cfg.server.dtype, "enforce_eager": True}
    env = cpu_env(cfg)
    in_process = device == "cpu" and cfg.tensor_parallel_size == 1
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine and worker in this process
        kwargs["distributed_executor_backend"] = "uni"
    t0 = time.perf_counter()
    # The engine reads env as it starts; put back after (the reload has its own). In-process, vLLM-CPU
    # must keep the linears' weights it prepacks, or the shards hold none (compat says why).
    with ExitStack() as scope:
        scope.enter_context(compat.scoped_env(env))
        if in_process:
            scope.enter_context(compat.vllm_cpu_keep_linear_weights())
        llm = LLM(**kwargs)
        try:
            llm.llm_engine.engine_core.save_sharded_state(path=str(out), max_size=cfg.max_file_bytes)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    # Config, tokenizer and chat template travel with the shards (vLLM reads them from the folder).
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    return time.perf_counter() - t0


def bytes_per_rank(folder: Path) -> dict[int, int]:
    ranks: dict[int, int] = {}
    for f in folder.iterdir():
        m = RANK_FILE.match(f.name)
        if m:
            ranks[int(m.group(1))] = ranks.get(int(m.group(1)), 0) + f.stat().st_size
    return dict(sorted(ranks.items()))


def reload_and_ask(cfg: ShardConfig, folder: Path, log_path: Path) -> dict:
    """Serve the shards with the real vLLM server (sharded_state loader) and ask one question."""
    import openai

    from workbench.serve import ServerError, VLLMServer

    env = {**cfg.server.env, **({"VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_omp_threads_bind}
                                if cfg.cpu_omp_threads_bind else {})}
    scfg = cfg.server.model_copy(update={
        "model_dir": str(folder), "load_format": "sharded_state",
        "tensor_parallel_size": cfg.tensor_parallel_size, "env": env})
    try:
        with VLLMServer(scfg, log_path=log_path) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=scfg.api_key or "none", max_retries=0)
            reply = client.chat.completions.create(
                model=scfg.model_name, temperature=0, max_tokens=24,
                messages=[{"role": "user", "content": PROMPT}])
            return {"success": True, "startup_s": round(server.startup_s, 1), "prompt": PROMPT,
                    "answer": reply.choices[0].message.content, "error": None}
    except (ServerError, openai.OpenAIError) as err:  # a failed reload is a result, recorded
        return {"success": False, "startup_s": None, "prompt": PROMPT, "answer": None,
                "error": str(err)[-4000:]}


def run(cfg: ShardConfig) -> Report:
    variant = cfg.variant
    src = Path(cfg.source_path)
    out = Path(cfg.out_path)
    with atomic_dir(out) as tmp:
        save_s = save_sharded(cfg, src, tmp)
    ranks = bytes_per_rank(out)
    log.info("%s: %d rank files, bytes per rank %s, saved in %.0f s", out, len(ranks), ranks, save_s)
    src_weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    if sum(ranks.values()) < 0.9 * src_weights:
        # vLLM-CPU with TP>1: the spawned workers drop their linears' weights (compat.vllm_cpu_keep_linear_weights)
        reload = {"success": False, "startup_s": None, "prompt": PROMPT, "answer": None,
                  "error": f"incomplete shards: {sum(ranks.values())} bytes saved for {src_weights} "
                           "bytes of source weights (vLLM-CPU drops prepacked linear weights); not reloaded"}
        log.error("%s", reload["error"])
    else:
        reload = reload_and_ask(cfg, out, Path("runs/logs") / f"vllm-shard-{variant}-tp{cfg.tensor_parallel_size}.log")
    content = tree_fingerprint(out)
    report = Report(
        stage="shard", variant=variant,  # reports/shard/<variant>.json; TP size in the metrics
        config=cfg.model_dump(mode="json"),
        data_fingerprint={"source": tree_fingerprint(src)},
        metrics={"tensor_parallel_size": float(cfg.tensor_parallel_size),
                 "total_bytes": float(content["bytes"]),
                 "save_s": round(save_s, 1),
                 "reload_startup_s": reload["startup_s"] or float("nan"),
                 "reload_success": float(reload["success"]),
                 **{f"rank{r}_bytes": float(b) for r, b in ranks.items()}},
        details=ShardDetails.checked({"bytes_per_rank": ranks, "files": sorted(f.name for f in out.iterdir()),
                                      "reload": reload, "cpu_env": cpu_env(cfg), "content": content}),
        outputs={"model": str(out)},
    )
    write_report(report)
    return report
