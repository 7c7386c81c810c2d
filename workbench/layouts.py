"""Parallel layouts of the speed stage's arms (issue 33): how one server spreads over GPUs, checked
against the model shape before any server starts, and the server keys each layout becomes.

    python -c "from workbench import layouts; from workbench.config import LayoutConfig as L; \
               layouts.check('llama-3.1-8b', 'data/shapes/llama-3.1-8b.json', 'tp2', L(tensor_parallel_size=2))"

A layout is ``speed.layouts.<name>``: tensor_parallel_size (TP), pipeline_parallel_size (PP) and
enable_expert_parallel (EP), using TP x PP GPUs. What vLLM needs of the shape, checked here so that
a profile fails on the CPU where it is written (``python -m pipelines.gpu.overlay PROFILE --check``
runs ``check_speed``), not after a GPU lease's setup:

- TP divides the attention heads (vLLM: "Total number of attention heads (9) must be divisible by
  tensor parallel size (2)"), and the KV heads divide by TP or TP by them (vLLM replicates a KV head
  that TP cuts finer);
- PP divides the layers. vLLM would split them unevenly; the roofline (workbench/roofline.py) takes
  equal stages, and an uneven split makes the largest stage the pipeline's pace;
- EP only on an MoE shape (a dense model has no experts to place), and only where TP spreads the
  experts over more than one GPU (vLLM's expert-parallel size is TP x DP; at 1 it changes nothing);
  and not on vLLM-CPU, whose fused-MoE kernel crashes with it (``refuse_on_cpu``).

On vLLM-CPU a layout of several ranks needs one OpenMP CPU set per rank: vLLM's automatic binding
wants a NUMA node per rank ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"),
so ``server_keys`` names the sets (``VLLM_CPU_OMP_THREADS_BIND``) unless the server's env does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from workbench import shapes

if TYPE_CHECKING:
    from workbench.config import LayoutConfig, SpeedConfig

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


class LayoutError(ValueError):
    """A layout the shape cannot be served in; the message names the key."""


def experts(shape: dict) -> int:
    """Routed experts per layer (Qwen-MoE ``num_experts``, Mixtral ``num_local_experts``); 0: dense."""
    return int(shape.get("num_experts") or shape.get("num_local_experts") or 0)


def check(shape_name: str, shape: str | Path | dict, layout_name: str, layout: "LayoutConfig") -> None:
    """Raise LayoutError, naming the ``speed.layouts`` key, if ``shape`` cannot be served in ``layout``."""
    cfg = shape if isinstance(shape, dict) else shapes.read_shape(shape)
    key = f"speed.layouts.{layout_name}"
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    layers = cfg["num_hidden_layers"]
    if heads % tp:
        raise LayoutError(f"{key}.tensor_parallel_size {tp} does not divide shape {shape_name}'s "
                          f"{heads} attention heads (vLLM refuses it)")
    if kv_heads % tp and tp % kv_heads:
        raise LayoutError(f"{key}.tensor_parallel_size {tp} and shape {shape_name}'s {kv_heads} KV heads: "
                          "neither divides the other (vLLM splits or replicates whole KV heads)")
    if layers % pp:
        raise LayoutError(f"{key}.pipeline_parallel_size {pp} does not divide shape {shape_name}'s "
                          f"{layers} layers (equal stages; the largest would set an uneven pipeline's pace)")
    if layout.enable_expert_parallel:
        if not experts(cfg):
            raise LayoutError(f"{key}.enable_expert_parallel: shape {shape_name} is dense (no num_experts / "
                              "num_local_experts): expert parallelism needs an MoE shape")
        if tp == 1:
            raise LayoutError(f"{key}.enable_expert_parallel with tensor_parallel_size 1: vLLM's expert-parallel "
                              "size is TP x DP, so the experts would stay on one GPU; set TP >= 2")


def check_speed(cfg: "SpeedConfig") -> None:
    """Every arm's layout against its shape (``check``), before a folder is built or a server started."""
    for name, shape in cfg.shapes.items():
        for lname in shape.layouts or cfg.layouts:
            check(name, shape.config, lname, cfg.layouts[lname])


def cpu_bind(ranks: int, cpus: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` with one CPU set per rank: the CPUs in ``ranks`` contiguous
    groups ("0-3|4-7"), or where ranks outnumber CPUs one CPU each, reused in turn ("0|1|0")."""
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        return "|".join(str(cpus[i % len(cpus)]) for i in range(ranks))
    per = len(cpus) // ranks
    groups = [cpus[i * per:(i + 1) * per] for i in range(ranks)]
    return "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def refuse_on_cpu(layout_name: str, layout: "LayoutConfig", device: str) -> None:
    """Expert parallelism on vLLM-CPU: seen on 0.32 (2026-12-06, toy-moe at TP=2), both workers die
    of a segfault in the fused-MoE kernel (csrc/cpu/cpu_fused_moe.cpp:242) on the first request;
    the same shape at TP=2 without EP, and at TP=1, serves. Refused here, named, before a server starts."""
    if device == "cpu" and layout.enable_expert_parallel:
        raise LayoutError(f"speed.layouts.{layout_name}.enable_expert_parallel: vLLM-CPU's fused-MoE kernel "
                          "crashes with expert parallelism (0.32: segfault in cpu_fused_moe.cpp); EP arms need a GPU")


def server_keys(layout: "LayoutConfig", device: str, env: dict[str, str]) -> dict:
    """The ``serve.chat`` keys of an arm in ``layout`` on ``device`` (``env``: the server's own,
    kept; on a CPU of several ranks the OpenMP binding added unless it names one; on a GPU host
    the layout's ``devices`` as CUDA_VISIBLE_DEVICES)."""
    keys: dict = {"tensor_parallel_size": layout.tensor_parallel_size,
                  "pipeline_parallel_size": layout.pipeline_parallel_size,
                  "enable_expert_parallel": layout.enable_expert_parallel}
    if device == "cpu" and layout.gpus > 1 and BIND_ENV not in env and BIND_ENV not in os.environ:
        keys["env"] = {**env, BIND_ENV: cpu_bind(layout.gpus, list(os.sched_getaffinity(0)))}
    if device == "cuda" and layout.devices is not None:
        keys["env"] = {**env, "CUDA_VISIBLE_DEVICES": layout.devices}
    return keys
