"""workbench.compat: each patch applies only in its version range, puts the original back on exit,
and still meets the upstream bug it works around (a test here fails when upstream fixes it, or
changes what the patch replaces). The quantization patches run in .venv-quant, through a subprocess.

    pytest tests/test_compat.py          # ~1 min: imports vLLM, lm-eval, AutoAWQ; loads no model
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

from workbench import compat

ROOT = Path(__file__).resolve().parents[1]
QUANT_PYTHON = Path(os.environ.get("WORKBENCH_QUANT_PYTHON", ROOT / ".venv-quant" / "bin" / "python"))
MAIN_ENV_PATCHES = ("lmeval_vllm_cpu_version", "lmeval_grouped_loglikelihood", "vllm_cpu_keep_linear_weights")
QUANT_ENV_PATCHES = ("torch_cpu_unpinned", "autoawq_cpu_scale_search")


def in_quant_env(script: str) -> dict:
    """Run tests/quant_env/<script> in .venv-quant with this checkout's workbench; its JSON line."""
    if not QUANT_PYTHON.exists():
        pytest.skip(f"no {QUANT_PYTHON} (./setup.sh creates it; or set WORKBENCH_QUANT_PYTHON)")
    proc = subprocess.run([str(QUANT_PYTHON), "-W", "ignore", str(ROOT / "tests" / "quant_env" / script)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the guard and the scope ------------------------------------------------------------------

def test_every_patch_names_a_version_range_and_a_reason():
    from packaging.specifiers import SpecifierSet

    assert set(compat.PATCHES) == set(MAIN_ENV_PATCHES + QUANT_ENV_PATCHES)
    for p in compat.PATCHES.values():
        assert SpecifierSet(p.versions) and len(p.why) > 30, p.name


@pytest.mark.parametrize("name", sorted(compat.PATCHES))
def test_version_guard_refuses_an_out_of_range_version_and_says_why(name, caplog):
    p = compat.PATCHES[name]
    with caplog.at_level(logging.WARNING, logger="workbench.compat"):
        assert compat.in_range(name, "999.0") is False
    msg = caplog.text
    assert f"{name} not applied" in msg and f"{p.dist} 999.0 is outside {p.versions}" in msg


@pytest.mark.parametrize("name", MAIN_ENV_PATCHES)
def test_installed_versions_are_inside_the_patch_ranges(name):
    """Upgrading the library fails here first: re-check the patch, then widen its range."""
    assert compat.in_range(name) is True


def test_scoped_env_sets_values_explicitly_and_restores_them(monkeypatch):
    monkeypatch.setenv("WB_COMPAT_SET", "old")
    monkeypatch.delenv("WB_COMPAT_UNSET", raising=False)
    with compat.scoped_env({"WB_COMPAT_SET": "new", "WB_COMPAT_UNSET": "1"}):
        assert os.environ["WB_COMPAT_SET"] == "new" and os.environ["WB_COMPAT_UNSET"] == "1"
    assert os.environ["WB_COMPAT_SET"] == "old" and "WB_COMPAT_UNSET" not in os.environ


def test_importing_compat_the_gateway_and_the_load_test_loads_no_engine():
    code = ("import sys, workbench.compat, workbench.gateway.server, workbench.loadtest; "
            "print([m for m in ('vllm', 'torch', 'lm_eval', 'awq', 'llmcompressor') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---- lm-eval 0.4.13 with vllm-cpu ---------------------------------------------------------------

def test_lmeval_vllm_still_needs_a_vllm_version_that_vllm_cpu_does_not_provide():
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("vllm")  # vllm-cpu's distribution is "vllm-cpu"
    with compat.lmeval_vllm_cpu_version():
        import lm_eval.models.vllm_causallms as module
    src = inspect.getsource(module)
    assert "from importlib.metadata import version" in src and 'version("vllm")' in src


def test_lmeval_vllm_cpu_version_is_in_place_only_inside_the_block():
    with compat.lmeval_vllm_cpu_version():
        import lm_eval.models.vllm_causallms as module

        assert module.version("vllm") == metadata.version("vllm-cpu") + "+cpu"
        assert metadata.version is not compat.vllm_version_with_cpu_fallback  # only during import
    assert module.version is metadata.version  # lm-eval's own binding again
    with pytest.raises(metadata.PackageNotFoundError):
        module.version("vllm")


def test_overridden_private_lmeval_method_keeps_its_signature():
    from workbench.evaluate import lmeval_vllm

    lmeval_vllm.register()
    from lm_eval.api.registry import get_model
    from lm_eval.models.vllm_causallms import VLLM

    ours = get_model(lmeval_vllm.MODEL_NAME)._loglikelihood_tokens
    assert list(inspect.signature(VLLM._loglikelihood_tokens).parameters) == ["self", "requests", "disable_tqdm"]
    assert list(inspect.signature(ours).parameters) == ["self", "requests", "disable_tqdm"]


# ---- vllm-cpu 0.32: linear weights after prepacking --------------------------------------------

def test_vllm_cpu_drops_linear_weights_unless_the_patch_keeps_them():
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    original = UnquantizedLinearMethod.__dict__["process_weights_after_loading"]
    method = UnquantizedLinearMethod()
    dropped = torch.nn.Linear(64, 32, bias=False)
    method.process_weights_after_loading(dropped)
    assert dropped.weight.numel() == 0  # the upstream behaviour the patch works around

    kept = torch.nn.Linear(64, 32, bias=False)
    weight = kept.weight.detach().clone()
    with compat.vllm_cpu_keep_linear_weights() as applied:
        assert applied
        method.process_weights_after_loading(kept)
    assert torch.equal(kept.weight, weight)
    x = torch.randn(2, 64)
    assert torch.allclose(method.apply(kept, x), x @ weight.T, atol=1e-4)  # still computes right
    assert UnquantizedLinearMethod.__dict__["process_weights_after_loading"] is original


def test_vllm_cpu_patch_is_not_applied_outside_its_range(monkeypatch):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    original = UnquantizedLinearMethod.__dict__["process_weights_after_loading"]
    monkeypatch.setattr(compat, "installed", lambda dist: "0.40.0")
    with compat.vllm_cpu_keep_linear_weights() as applied:
        assert applied is False
        assert UnquantizedLinearMethod.__dict__["process_weights_after_loading"] is original


# ---- uvicorn 0.54: no signal patch needed in a thread -------------------------------------------

def test_uvicorn_installs_no_signal_handlers_off_the_main_thread():
    """Why workbench.gateway.server no longer overrides install_signal_handlers (gone in 0.54)."""
    import uvicorn

    assert not hasattr(uvicorn.Server, "install_signal_handlers")
    server = uvicorn.Server(uvicorn.Config(app=None))
    before, seen = signal.getsignal(signal.SIGINT), []

    def enter():
        with server.capture_signals():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=enter)
    t.start()
    t.join(10)
    assert seen == [before]


# ---- .venv-quant: llm-compressor and AutoAWQ on CPU-only torch ----------------------------------

def test_autoawq_scale_search_restores_cpu_weights_only_with_the_patch():
    out = in_quant_env("awq_scale_search.py")
    assert out["cpu_is_alias"] is True  # Tensor.cpu() of a CPU tensor is itself: the bug's cause
    assert out["unpatched_restored"] is False  # AutoAWQ's own search leaves the weight scaled
    assert out["applied"] and out["patched_restored"] is True
    assert out["restored_after_exit"] is True
    assert out["signature"] == ["self", "x", "w_mean", "x_mean", "module2inspect", "linears2scale",
                                "fp16_output", "kwargs"]


def test_pin_memory_is_a_no_op_only_inside_the_block_on_cpu_only_torch():
    out = in_quant_env("pin_memory.py")
    if out["cuda"]:
        pytest.skip("CUDA torch pins memory itself")
    assert out["in_range"] == {n: True for n in QUANT_ENV_PATCHES}  # .venv-quant's versions
    assert out["llmcompressor_pins"] is True  # llm-compressor still pins its activation cache
    assert out["before"].startswith("refused")  # and CPU-only torch still refuses
    assert out["applied"] and out["inside"] == "self"
    assert out["after"].startswith("refused")
