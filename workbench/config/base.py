"""What every config shares: the ``Section`` base (unknown keys fail, values frozen), ``project``,
the dtypes, and the reading machinery: ``--set`` overrides, the merge of one mapping over another,
and the error a bad params file raises, which names the key (and for a key that was removed, why)."""

from __future__ import annotations

import difflib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

# Imported by these names: several configs have fields called ``variants`` and ``model_dir``.
from workbench.variants import model_dir as variant_dir

PARAMS_FILE = "params.yaml"
Dtype = Literal["bfloat16", "float16", "float32"]
# What a model computes in. "auto" resolves per machine (workbench.serve.resolve_dtype): on a CPU
# without native bf16 (no AVX512-BF16 / AMX) float32, which was 5x faster there than emulated
# bf16 and kept greedy answers right; on a GPU or a bf16 CPU the checkpoint's own dtype.
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: nested mappings key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the offending key."""


class Section(BaseModel):
    """Base of every config: unknown keys are errors, values are immutable once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectConfig(Section):
    experiment: str = "llm-workbench"  # MLflow experiment that holds every stage's runs
    seed: int = 0  # one seed for sampling, calibration order and load arrivals
    system_metrics: bool = True  # MLflow CPU/GPU/memory sampling while a stage runs


# Keys that were settings once, and why they are not: a params file that still sets one is told so.
REMOVED_KEYS = {
    # It could only break things: dvc.yaml declares models/<variant> as the stage's output whatever
    # it said, so another root left DVC tracking an empty folder (issue 29).
    "quantize.out_root": f"a variant is written to {variant_dir('<variant>')}, the folder dvc.yaml "
                         "declares as the quantize stage's output; remove the key (to write elsewhere, "
                         "run from another directory)",
}


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


def _describe(err: ValidationError, model: type[BaseModel], source: str, section: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden" and (full := f"{section}{dotted}") in REMOVED_KEYS:
            lines.append(f"'{full}' in {source} is no longer a setting: {REMOVED_KEYS[full]}")
        elif e["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            lines.append(
                f"unknown key '{dotted}' in {source}{_suggest(str(loc[-1]), known)}; "
                f"known keys here: {', '.join(known)}"
            )
        else:
            lines.append(f"bad value for '{dotted}' in {source}: {e['msg']} (got {e.get('input')!r})" if dotted
                         else f"{source}: {e['msg']}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prepare.dtype=float32"`` -> (["prepare", "dtype"], "float32"); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = yaml.safe_load(yaml.safe_dump(data, sort_keys=False)) or {}  # deep copy; key order kept (variant order)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return out
