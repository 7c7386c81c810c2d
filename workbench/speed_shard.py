"""The sharded checkpoint's save and reload time at a shape's size (issue 33), a step of the speed
stage (``speed.shard_arm``): the arm's random weights saved as vLLM ``sharded_state`` in its
layout, then served from those files, with the shard stage's own functions (workbench/shard.py).

    python -m pipelines.run_stage speed        # with speed.shard_arm: llama-3.1-8b-bf16-tp2

Why here and not the shard stage: that stage shards a variant's real weights (``models/<variant>``,
which dvc.yaml declares as its input and ``models/<variant>-tp<N>`` as its output); a shape has no
weights to carry, and 16 GB of random shards are nothing to keep. So the engine loads the shape
with the dummy loader, each rank writes its tensors (the shard stage's own save call, workbench/shard.py), the
server reloads them (``--load-format sharded_state``) and answers once, and the files are deleted:
the record is the seconds and the bytes per rank.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from workbench import shard
from workbench.config import ServerConfig, ShardConfig, SpeedConfig

log = logging.getLogger(__name__)


def shard_config(cfg: SpeedConfig, arm: str, keys: dict) -> ShardConfig:
    """The shard stage's config for ``arm``: its folder, TP size and server keys (``keys``: the arm's
    serve.chat keys from speed.arms), written under the speed stage's out_dir."""
    if keys.get("pipeline_parallel_size", 1) != 1:
        raise ValueError(f"speed.shard_arm {arm!r} uses pipeline_parallel_size {keys['pipeline_parallel_size']}: "
                         "vLLM's sharded save writes tensor-parallel ranks only; name a TP arm")
    base = cfg.resolved.server if cfg.resolved else ServerConfig()
    env = dict(keys.get("env", base.env))
    server = ServerConfig.model_validate({**base.model_dump(), **keys, "env": env})
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND")
    return ShardConfig(variant=arm, source_dir=str(keys["model_dir"]), tensor_parallel_size=keys["tensor_parallel_size"],
                       out_dir=str(Path(cfg.out_dir) / "shard" / arm), server=server, cpu_omp_threads_bind=bind)


def save_and_reload(cfg: SpeedConfig, arm: str, keys: dict) -> dict:
    """Save ``arm``'s random weights as sharded_state, reload them in a server, delete them: the
    seconds each took and the bytes per rank. A failed reload is a record (its error), as in shard."""
    scfg = shard_config(cfg, arm, keys)
    out = Path(scfg.out_path)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        save_s = shard.save_sharded(scfg, Path(scfg.source_path), out)  # engine start + load + write
        ranks = shard.bytes_per_rank(out)
        reload = shard.reload_and_ask(scfg, out, out.parent / f"vllm-{arm}-reload.log")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # random weights: nothing to keep
    result = {"arm": arm, "tensor_parallel_size": scfg.tensor_parallel_size, "save_s": round(save_s, 1),
              "bytes_per_rank": ranks, "total_bytes": sum(ranks.values()),
              "reload_startup_s": reload["startup_s"], "reload_success": reload["success"],
              "reload_error": reload["error"], "wall_s": round(time.perf_counter() - t0, 1)}
    log.info("speed shard %s: saved %d bytes over %d ranks in %.0f s; reload %s in %s s", arm,
             result["total_bytes"], len(ranks), save_s, "ok" if reload["success"] else "FAILED", reload["startup_s"])
    return result
