"""dvc.yaml's code dependencies, by rule: every stage depends on every first-party file it imports.

A stage's command (``python -m pipelines.run_stage <stage>``) imports pipelines/run_stage.py, which
executes the stage's notebook, whose cells import ``workbench.<stage>`` (STAGES[stage].module,
imported by name at run time), and so on. The import closure of those roots is computed here from
the source with ``ast``: every ``import``, wherever it sits (a function-level import runs too), a
literal ``importlib.import_module("...")``, and a literal ``[..., "-m", "workbench.x", ...]`` argv
(a subprocess running first-party code: its ``__main__``). Only first-party modules (workbench/,
pipelines/) are followed. A dependency on a folder covers the files under it. DVC itself expands
``foreach``/``matrix``, so each generated stage is checked with its own deps.

    python -m pytest tests/test_dvc_deps.py
    python tests/test_dvc_deps.py          # prints what each stage misses, and what it needs no more
"""

from __future__ import annotations

import ast
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("workbench", "pipelines")
RUNNER = "pipelines.run_stage"  # runs STAGES[<stage>]'s notebook, which imports its module


def module_file(name: str, root: Path = ROOT, main: bool = False) -> Path | None:
    """The file that ``import name`` executes (a package's ``__init__.py``; with ``main``, the
    ``__main__.py`` that ``python -m name`` runs), or None where it is not a first-party module."""
    if name.split(".")[0] not in FIRST_PARTY:
        return None
    base = root.joinpath(*name.split("."))
    package = base / ("__main__.py" if main else "__init__.py")
    if package.is_file():
        return package
    module = base.with_suffix(".py")
    return module if module.is_file() else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[tuple[str, bool]]:
    """(module name, run as ``-m``) for everything ``tree`` (the source of ``module``) may import:
    ``from a import b`` gives both ``a`` and ``a.b`` (b may be a submodule; the caller keeps what
    exists). ``if TYPE_CHECKING:`` blocks never run and are skipped."""
    found: set[tuple[str, bool]] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update((a.name, False) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add((base, False))
            found.update((f"{base}.{a.name}", False) for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.add((node.args[0].value, False))
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for flag, target in zip(items, items[1:]):
                if flag == "-m" and isinstance(target, str):
                    found.add((target, True))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def notebook_source(path: Path) -> str:
    """The code cells of a notebook as one module (IPython magics and shell lines dropped)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    lines = [ln for cell in code for ln in cell.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def import_closure(modules: list[tuple[str, bool]], notebooks: list[Path] = (), root: Path = ROOT) -> set[Path]:
    """Every first-party file that running ``modules`` ((name, as ``-m``)) and ``notebooks``
    executes: the modules, the ``__init__.py`` of each package on the way, what they import."""
    files: set[Path] = set(notebooks)
    todo: list[tuple[str, bool]] = list(modules)
    for nb in notebooks:
        todo += imported_names(ast.parse(notebook_source(nb)), "__notebook__", False)
    seen: set[tuple[str, bool]] = set()
    while todo:
        name, main = todo.pop()
        if (name, main) in seen:
            continue
        seen.add((name, main))
        path = module_file(name, root, main)
        if path is None:
            continue
        parts = name.split(".")
        todo += [(".".join(parts[:i]), False) for i in range(1, len(parts))]  # parent packages run first
        if main:
            todo.append((name, False))  # `python -m pkg` imports pkg before running pkg/__main__.py
        files.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        todo += imported_names(tree, name, path.name in ("__init__.py", "__main__.py"))
    return files


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def stage_roots(cmd: str, root: Path = ROOT) -> tuple[list[tuple[str, bool]], list[Path]]:
    """The modules and notebooks a stage's command runs: ``python -m M ...``, and for the DVC
    runner, the stage's notebook and module from the stage registry (imported by name there)."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], f"not a `python -m` command: {cmd}"
    modules, notebooks = [(argv[2], True)], []
    if argv[2] == RUNNER:
        from workbench.stages import STAGES

        spec = STAGES[argv[3]]
        modules.append((spec.module, False))
        notebooks.append(root / "notebooks" / spec.notebook)
    return modules, notebooks


def dvc_stages(root: Path = ROOT) -> dict[str, tuple[str, list[str]]]:
    """{stage: (cmd, file deps)} with foreach/matrix expanded by DVC itself."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.addressing: (s.cmd, [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)])
                for s in repo.index.stages}


CODE = ("workbench/", "pipelines/", "notebooks/")  # deps that are code; data and models are not checked


def check(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (first-party files its command imports that its deps do not cover,
    code deps that cover nothing it imports)}."""
    out = {}
    for name, (cmd, deps) in dvc_stages(root).items():
        files = sorted(str(f.relative_to(root)) for f in import_closure(*stage_roots(cmd, root), root=root))
        missing = [f for f in files if not covered(f, deps)]
        stale = [d for d in deps if d.startswith(CODE) and not any(covered(f, [d]) for f in files)]
        out[name] = (missing, stale)
    return out


# ---- the rule, on this repository's dvc.yaml --------------------------------------------------

@pytest.fixture(scope="module")
def checked() -> dict[str, tuple[list[str], list[str]]]:
    return check()


def _listing(gaps: dict[str, list[str]]) -> str:
    return "\n".join(f"  {stage}: {', '.join(files)}" for stage, files in sorted(gaps.items()))


def test_every_stage_depends_on_every_first_party_file_it_imports(checked):
    gaps = {stage: missing for stage, (missing, _) in checked.items() if missing}
    assert not gaps, ("dvc.yaml: these stages import files they do not depend on (an edit there would "
                      "leave `dvc repro` 'up to date'); add them as deps:\n" + _listing(gaps))


def test_no_stage_depends_on_code_it_does_not_import(checked):
    """The other direction: a code dep nothing imports re-runs the stage for nothing (and hides
    that a module moved or was renamed)."""
    gaps = {stage: stale for stage, (_, stale) in checked.items() if stale}
    assert not gaps, "dvc.yaml: these code deps cover nothing the stage imports; remove them:\n" + _listing(gaps)


def test_every_stage_of_the_registry_is_checked(checked):
    from workbench.stages import STAGES

    assert {name.split("@")[0].removesuffix("-base") for name in checked} == set(STAGES)


# ---- the closure itself, on a made-up package -----------------------------------------------

def _write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


@pytest.fixture
def tree(tmp_path) -> Path:
    _write(tmp_path, "workbench/__init__.py", "")
    _write(tmp_path, "workbench/stage.py", "import os\nfrom workbench import helper\n"
                                           "def run():\n    from .pkg import inner  # lazy\n")
    _write(tmp_path, "workbench/helper.py", "from typing import TYPE_CHECKING\n"
                                            "if TYPE_CHECKING:\n    from workbench import typing_only\n")
    _write(tmp_path, "workbench/typing_only.py", "")
    _write(tmp_path, "workbench/pkg/__init__.py", "")
    _write(tmp_path, "workbench/pkg/inner.py", "import importlib\nimportlib.import_module('workbench.dyn')\n"
                                               "CMD = ['python', '-m', 'workbench.tool', '--x']\n")
    _write(tmp_path, "workbench/dyn.py", "")
    _write(tmp_path, "workbench/tool/__init__.py", "")
    _write(tmp_path, "workbench/tool/__main__.py", "from . import cli\n")
    _write(tmp_path, "workbench/tool/cli.py", "")
    _write(tmp_path, "workbench/unused.py", "")
    nb = {"cells": [{"cell_type": "markdown", "source": ["import workbench.unused"]},
                    {"cell_type": "code", "source": ["%matplotlib inline\n", "from workbench import stage\n"]}]}
    _write(tmp_path, "notebooks/n.ipynb", json.dumps(nb))
    return tmp_path


def test_closure_follows_lazy_relative_dynamic_and_dash_m_imports_from_a_notebook(tree):
    files = import_closure([], [tree / "notebooks/n.ipynb"], root=tree)
    assert sorted(str(f.relative_to(tree)) for f in files) == [
        "notebooks/n.ipynb", "workbench/__init__.py", "workbench/dyn.py", "workbench/helper.py",
        "workbench/pkg/__init__.py", "workbench/pkg/inner.py", "workbench/stage.py",
        "workbench/tool/__init__.py", "workbench/tool/__main__.py", "workbench/tool/cli.py"]


def test_a_folder_dependency_covers_the_files_under_it_only():
    assert covered("workbench/loadgen/runner.py", ["workbench/loadgen"])
    assert covered("workbench/loadgen/runner.py", ["workbench/loadgen/"])
    assert covered("workbench/loadtest.py", ["workbench/loadtest.py"])
    assert not covered("workbench/loadtest/runner.py", ["workbench/loadtest.py"])
    assert not covered("workbench/loadgen2.py", ["workbench/loadgen"])


if __name__ == "__main__":
    for stage, (missing, stale) in check().items():
        print(f"{stage}: missing {', '.join(missing) or 'none'}; not imported {', '.join(stale) or 'none'}")
    sys.exit(0)
