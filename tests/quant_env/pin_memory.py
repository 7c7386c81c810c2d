"""Run in .venv-quant by tests/test_compat.py: CPU-only torch's pin_memory, with and without
workbench.compat.torch_cpu_unpinned, and whether llm-compressor still pins. Prints one JSON line."""

import inspect
import json

import torch
from llmcompressor.pipelines.cache import IntermediatesCache

from workbench import compat


def pins() -> str:
    t = torch.ones(2)
    try:
        return "self" if t.pin_memory() is t else "copy"
    except RuntimeError as err:
        return f"refused: {err}"


before = pins()
with compat.torch_cpu_unpinned() as applied:
    inside = pins()
print(json.dumps({"cuda": torch.cuda.is_available(), "before": before, "applied": applied,
                  "inside": inside, "after": pins(),
                  "in_range": {n: compat.in_range(n) for n in ("torch_cpu_unpinned", "autoawq_cpu_scale_search")},
                  "llmcompressor_pins": ".pin_memory()" in inspect.getsource(IntermediatesCache._pin_intermediate)}))
