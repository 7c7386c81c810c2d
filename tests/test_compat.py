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


# ---- internals relied on, not patched (compat.INTERNALS) ----------------------------------------

def _pins(lock: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split(";")[0].strip().partition("==")
        if sep and not name.startswith("#"):
            pins[canonicalize_name(name)] = version.split()[0]
    return pins


def _ranges() -> dict[str, list[tuple[str, str]]]:
    """{canonical distribution: [(registry entry, range)]} over PATCHES and INTERNALS."""
    from packaging.utils import canonicalize_name

    out: dict[str, list[tuple[str, str]]] = {}
    for p in compat.PATCHES.values():
        out.setdefault(canonicalize_name(p.dist), []).append((p.name, p.versions))
    for i in compat.INTERNALS.values():
        for dist, spec in i.versions.items():
            out.setdefault(canonicalize_name(dist), []).append((i.name, spec))
    return out


def test_every_internal_names_its_ranges_files_and_a_reason():
    import re

    from packaging.specifiers import SpecifierSet

    for i in compat.INTERNALS.values():
        assert i.versions and all(SpecifierSet(s) for s in i.versions.values()) and len(i.why) > 30, i.name
        for rel in i.where:  # the entry says where it is used, and it is used there
            assert re.search(i.token, (ROOT / rel).read_text()), f"{i.name}: {rel} does not say /{i.token}/"


def test_every_file_that_uses_an_internal_is_registered_with_it():
    """A new use of uvicorn's protocol, vLLM's process titles, ... elsewhere fails here until its
    file is added to the entry's ``where``."""
    import re

    code = [p for d in ("workbench", "pipelines") for p in (ROOT / d).rglob("*.py") if p.name != "compat.py"]
    for i in compat.INTERNALS.values():
        users = {str(p.relative_to(ROOT)) for p in code if re.search(i.token, p.read_text())}
        assert users <= set(i.where), f"{i.name}: also used in {sorted(users - set(i.where))}"


@pytest.mark.parametrize("name", sorted(compat.INTERNALS))
def test_installed_versions_are_inside_the_internals_ranges(name):
    """Upgrading the library fails here first: re-check the internal (its test below), then widen."""
    i = compat.INTERNALS[name]
    assert compat.outside(i.versions, {d: compat.installed(d) for d in i.versions}) == []


def test_outside_names_the_version_and_the_range_and_skips_what_is_missing():
    assert compat.outside(compat.UVICORN, {"uvicorn": "0.53.0"}) == ["uvicorn 0.53.0 is outside >=0.54,<0.56"]
    assert compat.outside(compat.UVICORN, {"uvicorn": "0.56.0"}) != []
    assert compat.outside(compat.UVICORN, {"uvicorn": "0.55.1"}) == []
    assert compat.outside(compat.VLLM, {"vllm": None, "vllm-cpu": "0.32.0"}) == []


def test_every_lock_pins_each_registered_library_inside_its_ranges():
    """A lock bumped past what a patch or an internal was checked against fails here, for the
    environments this machine does not have too (CUDA, quantization)."""
    ranges, found = _ranges(), set()
    for lock in sorted((ROOT / "requirements").glob("*.lock")):
        for dist, version in _pins(lock).items():
            for entry, spec in ranges.get(dist, []):
                found.add(dist)
                assert not compat.outside({dist: spec}, {dist: version}), f"{lock.name}: {dist}=={version}, {entry} {spec}"
    assert {"uvicorn", "vllm-cpu", "vllm", "lm-eval", "transformers", "llmcompressor", "autoawq"} <= found


def test_pyproject_bounds_are_the_ranges_checked():
    """pyproject.toml may not allow a version of a registered library that nothing was checked on."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    ranges = _ranges()
    listed = [r for r in reqs if canonicalize_name(r.name) in ranges]
    assert [canonicalize_name(r.name) for r in listed] == ["uvicorn"]
    for r in listed:
        for entry, spec in ranges[canonicalize_name(r.name)]:
            assert r.specifier == SpecifierSet(spec), f"pyproject {r}: {entry} was checked on {spec}"


def test_uvicorn_httptools_protocol_still_has_the_state_the_gateway_uses():
    import asyncio

    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
    from uvicorn.server import ServerState

    from workbench.gateway.http import GatewayHttpProtocol

    loop = asyncio.new_event_loop()
    try:
        state = ServerState()
        proto = HttpToolsProtocol(Config(app=lambda *a: None, http="httptools"), state, {}, _loop=loop)
    finally:
        loop.close()
    assert proto.connections is state.connections and proto.cycle is None and not proto.pipeline
    assert proto.loop is loop and hasattr(proto, "transport")
    assert STATUS_LINE[408].startswith(b"HTTP/1.1 408 ") and STATUS_LINE[413].endswith(b"\r\n")
    cycle = inspect.signature(RequestResponseCycle).parameters
    assert {"scope", "message_event", "keep_alive"} <= set(cycle)
    src = inspect.getsource(RequestResponseCycle.__init__)
    for attr in ("response_started", "response_complete", "disconnected"):
        assert f"self.{attr} = False" in src, attr
    overridden = [n for n, v in vars(GatewayHttpProtocol).items()
                  if callable(v) and not n.startswith("_") and n != "configured"]
    assert {"connection_made", "connection_lost", "data_received", "on_message_begin"} <= set(overridden)
    for n in overridden:  # every override still overrides something, with the same parameters
        assert list(inspect.signature(getattr(GatewayHttpProtocol, n)).parameters) == \
            list(inspect.signature(getattr(HttpToolsProtocol, n)).parameters), n


def test_uvicorn_resolves_a_protocol_named_by_import_string_and_multiprocess_takes_config_and_sockets():
    from uvicorn.config import Config
    from uvicorn.supervisors import Multiprocess

    from workbench.gateway.http import GatewayHttpProtocol

    config = Config(app=lambda *a: None, http="workbench.gateway.http:GatewayHttpProtocol")
    config.load()
    assert config.http_protocol_class is GatewayHttpProtocol  # what each spawned worker does
    assert list(inspect.signature(Multiprocess).parameters) == ["config", "sockets"]
    assert callable(Multiprocess.run)


def test_vllm_still_titles_its_engine_core_process():
    from vllm import envs
    from vllm.utils import system_utils
    from vllm.v1.engine import core

    assert envs.VLLM_PROCESS_NAME_PREFIX == "VLLM"
    assert 'f"{prefix}::{name}"' in inspect.getsource(system_utils.set_process_title)
    assert 'process_title = "EngineCore"' in inspect.getsource(core)


def test_vllm_engine_client_still_saves_sharded_state():
    from vllm.v1.engine import core_client, llm_engine

    base = core_client.EngineCoreClient.save_sharded_state
    assert list(inspect.signature(base).parameters) == ["self", "path", "pattern", "max_size"]
    assert core_client.InprocClient.save_sharded_state is not base  # TP=1 in-process: implemented
    assert core_client.SyncMPClient.save_sharded_state is not base
    assert "self.engine_core = " in inspect.getsource(llm_engine.LLMEngine.__init__)


def test_lm_eval_still_ships_the_task_yamls_the_local_suites_include():
    from lm_eval.tasks._yaml_loader import load_yaml

    from workbench.evaluate.sets import SUITES, lm_eval_tasks_dir

    assert len(SUITES["mmlu"].stock_yamls()) == 57 and len(SUITES["ceval"].stock_yamls()) == 52
    assert (lm_eval_tasks_dir() / "wikitext" / "wikitext.yaml").is_file()
    cfg = load_yaml(SUITES["mmlu"].stock_yamls()["astronomy"], resolve_func=False)  # includes followed
    assert cfg["task"] == "mmlu_astronomy" and cfg["dataset_path"] == "cais/mmlu" and cfg["test_split"] == "test"


def test_transformers_quantizer_still_removes_its_quantization_config():
    """from_pretrained sets ``model.hf_quantizer`` (tests/test_prepare.py loads the GGUF for real)."""
    from transformers import modeling_utils
    from transformers.quantizers.base import HfQuantizer

    assert "model.hf_quantizer = hf_quantizer" in inspect.getsource(modeling_utils.PreTrainedModel.from_pretrained)
    assert list(inspect.signature(HfQuantizer.remove_quantization_config).parameters) == ["self", "model"]
