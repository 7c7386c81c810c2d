"""``speed``: speed-only arms, model shapes served with random weights in several precisions and
parallel layouts, measured with the load test's executor. See workbench/speed.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from workbench.config.base import Section
from workbench.config.loadtest import LoadtestConfig


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
