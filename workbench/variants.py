"""Variant names and where a variant lives on disk: one home each.

    python -c "from workbench import variants; print(variants.model_dir('gptq-int4'))"

A *variant* is a model folder plus how to serve it (docs/reference.md). Every stage finds a
variant's folder here, never by writing ``models/...`` itself; dvc.yaml, which cannot import
Python, declares the same layout (``models/${key}``, ``models/${shard.variant}-tp<N>``) and
tests/test_variants.py holds the two together.
"""

from __future__ import annotations

BASE = "base"  # the unquantized reference prepare writes; quantized variants are made from it
ALL = "all"  # the variant name of a report over every variant: reports/report/all.json, reports/loadtest/all.json
# Relative to the project root, where DVC runs every stage. Not a setting: dvc.yaml declares
# models/<variant> as each stage's output, so a folder elsewhere would leave DVC tracking nothing.
MODELS_ROOT = "models"


def model_dir(variant: str, override: str | None = None) -> str:
    """The folder of ``variant``: ``models/<variant>``, unless the config names another (``override``,
    e.g. evaluate.model_dir for a folder outside the pipeline)."""
    return override or f"{MODELS_ROOT}/{variant}"


def sharded_dir(variant: str, tensor_parallel_size: int) -> str:
    """The shard stage's output for ``variant`` at TP = N: ``models/<variant>-tp<N>``."""
    return f"{model_dir(variant)}-tp{tensor_parallel_size}"
