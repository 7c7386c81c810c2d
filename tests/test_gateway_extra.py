"""The ``workbench[gateway]`` extra on its own: installed into a fresh venv from this checkout, it
pulls no vLLM or torch, and the gateway it installs starts and relays an authenticated chat
request to the fake upstream (started here, from the main venv).

    pytest tests/test_gateway_extra.py                    # with uv on PATH: ~30 s
    WORKBENCH_SLOW=1 pytest tests/test_gateway_extra.py   # without uv: pip, 2.5-3 min

Uses ``uv`` when it is on PATH (22-29 s measured on 2 shared cores: 9-15 s install, 9-12 s start),
else pip, which makes it a ``slow`` test (146-179 s measured, nearly all of it pip resolving,
downloading and installing 50 packages). Needs the package index (PyPI, or PIP_INDEX_URL /
UV_INDEX_URL) and is skipped when that is unreachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from workbench.gateway.process import GatewayProcess
from workbench.net import free_port
from workbench.testing.fakeserver import FakeServer

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = ("vllm", "torch", "lm_eval", "transformers", "mlflow", "dvc")
INSTALL_TIMEOUT_S = 900

UV = shutil.which("uv")
# pip takes over 2 minutes here, uv well under one: only the pip path is a slow test
slow_without_uv = (lambda f: f) if UV else (lambda f: pytest.mark.slow(pytest.mark.skipif(
    not os.environ.get("WORKBENCH_SLOW"), reason="minutes of pip install without uv; set WORKBENCH_SLOW=1")(f)))


def _index_url() -> str:
    url = os.environ.get("UV_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"
    return url.rstrip("/") + "/"


def _index_reachable(url: str) -> bool:
    if not url.startswith("http"):
        return Path(url.removeprefix("file://")).exists()
    try:
        with urllib.request.urlopen(url + "pip/", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def _install(tmp: Path) -> Path:
    """A fresh venv with ``<copy of this checkout>[gateway]``; returns its python.

    The copy (pyproject, README, the package) keeps pip's in-tree build files out of the checkout."""
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "workbench", src / "workbench", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if UV:
        cmds = [[UV, "venv", "--python", sys.executable, str(venv)],
                [UV, "pip", "install", "--python", str(python), f"{src}[gateway]"]]
    else:
        cmds = [[sys.executable, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "-q", f"{src}[gateway]"]]
    for cmd in cmds:
        r = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return python


def test_gateway_extra_bounds_admit_the_locked_versions():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lock = {}
    for line in (ROOT / "requirements" / "main.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            lock[canonicalize_name(name)] = version.split(";")[0].strip()
    for req in map(Requirement, extras["gateway"]):
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is in the gateway extra but not in requirements/main.lock"
        assert req.specifier.contains(lock[name]), f"main.lock has {req.name}=={lock[name]}, outside {req}"
        assert name not in {"vllm", "torch"}


def test_gateway_imports_nothing_of_the_pipeline(tmp_path):
    """Here vLLM and torch are installed, so an import of them would succeed: look for it."""
    heavy = {*PIPELINE_ONLY, "pandas", "matplotlib", "numpy", "openai", "httpx"}
    code = ("import sys, workbench.gateway.server, workbench.gateway.cli, workbench.gateway.__main__\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(heavy)!r}\n"
            "             or m.startswith('workbench.') and not m.startswith('workbench.gateway') and m not in ('workbench.net', 'workbench.sse')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@slow_without_uv
def test_gateway_extra_installs_without_vllm_and_serves(tmp_path):
    if not _index_reachable(_index_url()):
        pytest.skip(f"package index {_index_url()} unreachable: the extra cannot be installed")
    t0 = time.monotonic()
    python = _install(tmp_path)
    install_s = time.monotonic() - t0
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}

    def in_venv(*args: str) -> subprocess.CompletedProcess:
        # cwd = tmp_path, so `workbench` can only come from the venv, never from this checkout
        return subprocess.run([str(python), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    probe = in_venv("-c", "import importlib.util as u, workbench; "
                          f"print(workbench.__file__); print([m for m in {PIPELINE_ONLY!r} if u.find_spec(m)])")
    assert probe.returncode == 0, probe.stderr
    where, found = probe.stdout.splitlines()
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    assert found == "[]", f"the gateway extra pulled in pipeline packages: {found}"

    port = free_port()
    cfg = tmp_path / "gateway.yaml"
    with FakeServer(ttft_ms=0, output_tokens=3, model="fake-model") as fake:
        cfg.write_text(yaml.safe_dump({
            "host": "127.0.0.1", "port": port,
            "upstreams": {"fake-model": {"base_url": fake.base_url}},
            "keys_file": str(tmp_path / "keys.yaml"),
            "filter": {"word_lists": [str(ROOT / "data/gateway/sensitive_words.en.txt"),
                                      str(ROOT / "data/gateway/sensitive_words.zh.txt")]},
            "audit": {"path": str(tmp_path / "audit.sqlite")},
        }))
        added = in_venv("-m", "workbench.gateway", "--config", str(cfg), "add-key", "team-a", "--rpm", "600")
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip()
        assert len(key) >= 32 and "team-a" in (tmp_path / "keys.yaml").read_text()
        scraper = in_venv("-m", "workbench.gateway", "--config", str(cfg), "add-key", "prometheus", "--metrics")
        assert scraper.returncode == 0, scraper.stderr
        metrics_key = scraper.stdout.strip()

        with GatewayProcess(cfg, port, python=str(python), cwd=tmp_path, env=env,
                            log_path=tmp_path / "gateway.log", grace_s=15) as gw:
            start_s = time.monotonic() - t0 - install_s
            root = gw.root_url

            body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
            anon = httpx.post(f"{root}/v1/chat/completions", json=body, timeout=30)
            assert anon.status_code == 401
            r = httpx.post(f"{root}/v1/chat/completions", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"].strip() == "tok tok tok"
            tenant = httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            assert tenant.status_code == 403  # a tenant's key never reads other tenants' counters
            metrics = httpx.get(f"{root}/metrics", headers={"Authorization": f"Bearer {metrics_key}"}, timeout=10)
            assert 'workbench_gateway_requests_total{' in metrics.text
    print(f"gateway extra: install {install_s:.0f} s ({'uv' if UV else 'pip'}), "
          f"start {start_s:.1f} s")
