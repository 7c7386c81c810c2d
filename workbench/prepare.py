"""Stage ``prepare``: turn a model source into the base variant, a Hugging Face folder vLLM serves.

    workbench prepare                                   # the embedded default (SmolLM2-135M GGUF)
    workbench prepare --set prepare.model.source=/models/my.gguf --set prepare.model.name=mine

A GGUF file is dequantized by transformers into ``dtype`` safetensors plus tokenizer and chat
template; a local HF folder or hub id is loaded and re-saved in ``dtype``. The embedding model's
folder is copied beside it. The report records parameter count, bytes, dtype, architecture, a
content hash of every output, and a greedy answer to ``smoke_prompt``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from workbench import sources, variants
from workbench.config import PrepareConfig
from workbench.reports import (Details, GreedyAnswer, Report, TreeFingerprint, atomic_dir, sha256_file,
                               tree_fingerprint, write_report)

log = logging.getLogger(__name__)
VARIANT = variants.BASE  # prepare writes the unquantized variant the others are made from


class ModelCard(BaseModel):
    """The base model as written to ``out_dir``: what transformers' config says of it."""

    model_config = ConfigDict(extra="forbid")

    name: str  # prepare.model.name, the served name
    architecture: str
    dtype: str
    parameters: int
    has_chat_template: bool
    model_type: str | None = None
    # from the config, where it has them
    num_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    content: TreeFingerprint


class EmbeddingCard(BaseModel):
    """The embedding model copied to ``embedding_out_dir``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    architecture: str | None = None
    model_type: str | None = None
    embedding_dim: int | None = None  # its config's hidden_size
    content: TreeFingerprint


class PrepareDetails(Details):
    """``details`` of reports/prepare/base.json. JSON Schema: docs/schemas/prepare.json."""

    model: ModelCard
    smoke: GreedyAnswer | None = None  # None: prepare.smoke_max_new_tokens is 0
    embedding: EmbeddingCard | None = None  # None: no prepare.embedding


class PrepareReport(Report):
    """reports/prepare/base.json, typed."""

    details: PrepareDetails


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _load(src: sources.Resolved, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.kind == "gguf":
        kw = {"gguf_file": src.gguf_file}
        where = src.gguf_dir
    else:
        kw, where = {}, src.path
    log.info("loading %s (%s) as %s", src.spec, src.kind, dtype)
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=_torch_dtype(dtype), **kw)
    # A GGUF load marks the model as "quantized with GGUF", which save_pretrained refuses to write;
    # the weights are already dequantized into `dtype`, so the marker is dropped.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None and src.kind == "gguf":
        del model.config.quantization_config
    return model, tokenizer


def materialize_causal_lm(src: sources.Resolved, out: Path, dtype: str) -> dict:
    model, tokenizer = _load(src, dtype)
    if not tokenizer.chat_template:
        log.warning("%s has no chat template: /v1/chat/completions will need --chat-template", src.spec)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg = model.config
    return {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "has_chat_template": bool(tokenizer.chat_template),
    }


def smoke_generate(model_dir: Path, prompt: str, max_new_tokens: int, dtype: str) -> dict:
    """Greedy answer from the written folder (not the in-memory model): proves the files load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype))
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return {
        "prompt": prompt,
        "answer": tok.decode(new, skip_special_tokens=True).strip(),
        "new_tokens": int(new.numel()),
        "seconds": round(seconds, 3),
    }


def copy_embedding_model(src: sources.Resolved, out: Path) -> dict:
    if src.kind != "hf":
        raise sources.SourceError(f"{src.spec}: embedding models must be Hugging Face folders")
    shutil.copytree(src.path, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    import json

    cfg = json.loads((out / "config.json").read_text())
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "embedding_dim": cfg.get("hidden_size"),
    }


def run(cfg: PrepareConfig) -> Report:
    t0 = time.perf_counter()
    src = sources.resolve(cfg.model.source, cfg.model.revision)
    source_print = (
        {"sha256": sha256_file(src.path), "bytes": src.path.stat().st_size}
        if src.kind == "gguf" else tree_fingerprint(src.path)
    )
    out = Path(cfg.out_dir)
    with atomic_dir(out) as tmp:
        card = materialize_causal_lm(src, tmp, cfg.dtype)
    card["content"] = tree_fingerprint(out)
    convert_s = time.perf_counter() - t0

    smoke = (
        smoke_generate(out, cfg.smoke_prompt, cfg.smoke_max_new_tokens, cfg.dtype)
        if cfg.smoke_max_new_tokens else None
    )

    fingerprints = {"model_source": {"spec": src.spec, "kind": src.kind, **source_print}}
    outputs = {"model": str(out)}
    embed_card = None
    if cfg.embedding is not None:
        esrc = sources.resolve(cfg.embedding.source, cfg.embedding.revision)
        eout = Path(cfg.embedding_out_dir)
        with atomic_dir(eout) as tmp:
            embed_card = copy_embedding_model(esrc, tmp)
        embed_card["content"] = tree_fingerprint(eout)
        fingerprints["embedding_source"] = {"spec": esrc.spec, "kind": esrc.kind}
        outputs["embedding_model"] = str(eout)

    metrics = {
        "parameters": float(card["parameters"]),
        "model_bytes": float(card["content"]["bytes"]),
        "convert_s": round(convert_s, 3),
        "prepare_s": round(time.perf_counter() - t0, 3),
    }
    if smoke:
        metrics["smoke_tokens_per_s"] = round(smoke["new_tokens"] / max(smoke["seconds"], 1e-9), 2)
    if embed_card:
        metrics["embedding_bytes"] = float(embed_card["content"]["bytes"])
    report = Report(
        stage="prepare",
        variant=VARIANT,
        config=cfg.model_dump(mode="json"),
        data_fingerprint=fingerprints,
        metrics=metrics,
        details=PrepareDetails.checked({
            "model": {"name": cfg.model.name, **card}, "smoke": smoke,
            "embedding": {"name": cfg.embedding.name, **embed_card} if embed_card else None}),
        outputs=outputs,
    )
    write_report(report)
    log.info("prepare: %s -> %s (%d params, %.1f MB)", src.spec, out, card["parameters"],
             card["content"]["bytes"] / 1e6)
    return report


def summary(report: Report):
    """One-row-per-model table for notebooks."""
    import pandas as pd

    d = PrepareDetails.of(report)
    rows = [{"model": card.name, "architecture": card.architecture,
             "parameters": getattr(card, "parameters", None), "dtype": getattr(card, "dtype", None),
             "bytes": card.content.bytes, "sha256": card.content.sha256[:12]}
            for card in (d.model, d.embedding) if card is not None]
    return pd.DataFrame(rows)
