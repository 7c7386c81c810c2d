"""The fast tier (``python -m pytest -m "not slow"``): tests/conftest.py marks ``slow`` by rule, so
these check the rule and its list, not the tests one by one.

    python -m pytest tests/test_tiers.py
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SLOW, SLOW_FIXTURES, slow_reason

TESTS = Path(__file__).resolve().parent


def item(name: str = "test_x", module: str = "test_mod.py", fixtures=(), markers=()):
    """What slow_reason reads of a collected test."""
    return SimpleNamespace(originalname=name, name=name, path=TESTS / module, fixturenames=list(fixtures),
                           get_closest_marker=lambda m: m if m in markers else None)


def test_a_test_using_a_real_server_fixture_is_slow_and_says_which():
    assert slow_reason(item(fixtures=["tmp_path", "chat_server"])).startswith("fixture chat_server: a vLLM")
    assert slow_reason(item(fixtures=["tmp_path", "monkeypatch"])) is None


def test_integration_and_gpu_markers_are_slow():
    assert slow_reason(item(markers=["integration"])) == "marked integration"
    assert slow_reason(item(markers=["gpu"])) == "marked gpu"


def test_a_listed_module_or_test_is_slow_and_its_neighbours_are_not():
    assert slow_reason(item(module="test_gpu_pipeline.py")) == SLOW["test_gpu_pipeline.py"]
    assert slow_reason(item("test_fuzz_1000_cases_find_no_5xx", "test_gateway_fuzz.py"))
    assert slow_reason(item("test_fuzz_quick_finds_no_5xx", "test_gateway_fuzz.py")) is None


def _tests_defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("entry", sorted(SLOW))
def test_every_slow_entry_names_a_test_that_exists(entry):
    """A renamed or deleted test leaves no stale entry behind (and no test silently fast again)."""
    module, _, test = entry.partition("::")
    assert (TESTS / module).is_file(), entry
    assert not test or test in _tests_defined(TESTS / module), entry


def test_every_slow_fixture_exists():
    defined = set().union(*(_tests_defined(p) for p in TESTS.glob("*.py")))
    assert set(SLOW_FIXTURES) <= defined


def test_leftover_check_counts_this_sessions_processes_only():
    """Another session's vLLM on a shared machine is not a leftover of ours (that made the fast
    tier fail on a busy host); a child with our marker, or one started with a bare environment, is."""
    import os
    import subprocess
    import sys

    import psutil

    from conftest import SESSION_ENV, _ours

    code = "import time; time.sleep(30)"
    env = {k: v for k, v in os.environ.items() if k != SESSION_ENV}
    stranger = subprocess.Popen(["setsid", sys.executable, "-c", f"import os; os.fork() and exit(); {code}"],
                                env=env)  # its fork is reparented away from us, with no marker
    mine = subprocess.Popen([sys.executable, "-c", code])
    bare = subprocess.Popen([sys.executable, "-c", code], env=env)
    orphans = []
    try:
        stranger.wait(10)
        orphans = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and
                   p.info["cmdline"][-1].endswith(code) and p.pid not in (mine.pid, bare.pid)]
        assert orphans and not any(_ours(p) for p in orphans)
        assert _ours(psutil.Process(mine.pid)) and _ours(psutil.Process(bare.pid))
    finally:
        for p in (mine, bare):
            p.kill()
            p.wait()
        for p in orphans:
            p.kill()
