"""A DVC remote for the team: what one clone computed and pushed, a fresh clone pulls, and
``dvc repro`` there runs nothing (docs/team.md)."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cwd: Path, *cmd: str, timeout: int = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the stages' `python`
    env.pop("MLFLOW_TRACKING_URI", None)  # the stage tracks into the project's own mlflow.db
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args)


def test_every_stage_output_reaches_a_clone_through_git_or_the_dvc_remote(tmp_path):
    """``dvc push`` sends cached outputs only; an output with ``cache: false`` must be committed
    to git instead, or a fresh clone lacks it and re-runs its stage."""
    from dvc.repo import Repo

    (tmp_path / ".dvc").mkdir()
    for rel in ("dvc.yaml", "params.yaml", ".dvc/config"):
        shutil.copy(ROOT / rel, tmp_path / rel)
    run(tmp_path, "git", "init", "-q")
    with Repo(str(tmp_path)) as repo:
        outs = [(str(out.def_path), out.use_cache) for stage in repo.index.stages for out in stage.outs]
    assert len(outs) > 20  # the whole pipeline, templated stages expanded
    uncached = sorted({path for path, cached in outs if not cached})
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *uncached], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not ignored, f"neither in the DVC remote (cache: false) nor in git (.gitignore): {ignored}"
    tracked = run(ROOT, "git", "ls-files", *uncached).split()
    assert tracked == uncached  # metrics.json: a clone has it from git


@pytest.mark.integration
def test_fresh_clone_pulls_the_outputs_from_the_remote_and_repro_runs_nothing(project, tmp_path):
    remote = tmp_path / "dvc-remote"  # a local-directory remote; s3:// works the same (dvc-s3)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "the project")
    dvc(project, "repro", "prepare")
    dvc(project, "remote", "add", "-d", "team", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "prepare ran; the team's remote")
    dvc(project, "push", "prepare")
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    outputs = ["models/base", "models/embed", "reports/prepare/base.json", "runs/notebooks/01_prepare.ipynb"]
    assert not any((clone / o).exists() for o in outputs)  # git carries the lock, not the outputs

    dvc(clone, "pull", "prepare")
    assert "Data and pipelines are up to date" in dvc(clone, "status", "prepare")
    again = dvc(clone, "repro", "prepare")
    assert "didn't change" in again and "Running stage" not in again
    for o in outputs:
        a, b = project / o, clone / o
        if a.is_dir():
            files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
            assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
            match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
            assert not mismatch and not errors, (o, mismatch, errors)
        else:
            assert a.read_bytes() == b.read_bytes(), o
