"""The quantize report's typed ``details`` (reports/quantize/<variant>.json): what the stage
writes and what the report stage and notebooks read. Its JSON Schema is docs/schemas/quantize.json
(``python -m workbench.schemas``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from workbench.reports import Details, GreedyAnswer, Report, TreeFingerprint


class QuantCheck(BaseModel):
    """The written variant read back (``stage.check``): perplexity next to base's on the same
    tokens of ``quantize.check.ppl_corpus``, and a greedy answer."""

    model_config = ConfigDict(extra="forbid")

    how: str  # which loader read the files (transformers decompressing, or workbench's AWQ reader)
    tokens: int
    window: int  # tokens per non-overlapping perplexity window
    perplexity: float
    perplexity_base: float
    perplexity_ratio: float  # perplexity / perplexity_base
    broken: bool  # ratio above quantize.check.broken_ppl_ratio
    smoke: GreedyAnswer | None = None  # None: quantize.smoke_max_new_tokens is 0


class QuantizeDetails(Details):
    """``details`` of a quantize report: the method and settings, what the checkpoint says of
    itself, and the check."""

    method: str  # the registered method (quantize/methods.py)
    format: str  # compressed-tensors | awq
    bits: int
    group_size: int
    symmetric: bool
    quant_method: str | None = None  # the checkpoint's quantization_config.quant_method
    quantization_config: dict[str, Any] = {}  # as the checkpoint's config.json holds it (the library's schema)
    vllm_cpu_servable: bool
    check: QuantCheck
    content: TreeFingerprint


class QuantizeReport(Report):
    """reports/quantize/<variant>.json, typed."""

    details: QuantizeDetails
