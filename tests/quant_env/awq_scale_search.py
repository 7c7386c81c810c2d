"""Run in .venv-quant by tests/test_compat.py: AutoAWQ's scale search on a tiny CPU linear, with and
without workbench.compat.autoawq_cpu_scale_search. Prints one JSON line."""

import inspect
import json

import torch
from awq.quantize.quantizer import AwqQuantizer

from workbench import compat

original = AwqQuantizer._compute_best_scale


def search(quantizer) -> bool:
    """Whether the linear's weight is back to its original after the scale search."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(8, 8, bias=False)
    before = fc.weight.detach().clone()
    x = torch.rand(4, 8) + 0.5
    with torch.no_grad():
        quantizer._compute_best_scale(x, fc.weight.abs().mean(0), x.abs().mean(0), fc, [fc], fc(x), {})
    return torch.equal(fc.weight.detach(), before)


q = AwqQuantizer.__new__(AwqQuantizer)  # no model: only what the scale search reads
q.w_bit, q.group_size, q.zero_point, q.duo_scaling, q.max_chunk_memory = 4, 8, True, True, 1024 ** 3
q.n_parallel_calib_samples = None
unpatched = search(q)
with compat.autoawq_cpu_scale_search() as applied:
    patched = search(q)
print(json.dumps({
    "cpu_is_alias": (lambda t: t.cpu() is t)(torch.ones(1)),
    "signature": list(inspect.signature(original).parameters),
    "unpatched_restored": unpatched, "applied": applied, "patched_restored": patched,
    "restored_after_exit": AwqQuantizer._compute_best_scale is original,
}))
