"""Your model in one place: dvc.yaml takes the variant list, the TP size and the served name from
params.yaml, so another model, other variants and another TP size plan without touching dvc.yaml.
DVC plans here (``dvc repro --dry``, ``dvc dag``), it runs nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def dvc(cwd: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    return out.stdout


def _inside(path: str, other: str) -> bool:
    return path == other or path.startswith(other + "/") or other.startswith(path + "/")


def project_copy(tmp: Path, edit) -> Path:
    """dvc.yaml, params.yaml (through ``edit``), .dvc/config and a git repository in ``tmp``, plus
    every dependency no stage produces (source, notebooks, data), copied from this repository, and
    a placeholder file for every stage output (without a dvc.lock every stage is still planned)."""
    (tmp / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    shutil.copy(ROOT / ".dvc" / "config", tmp / ".dvc" / "config")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp, check=True)
    status = json.loads(dvc(tmp, "status", "--json"))
    deps, outs = set(), set()
    for entries in status.values():
        for entry in entries:
            if isinstance(entry, dict):
                deps |= set(entry.get("changed deps", {}))
                outs |= set(entry.get("changed outs", {}))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    for dep in sorted(deps - {"params.yaml"}):
        if any(_inside(dep, o) for o in outs):
            continue  # another stage writes it
        files = [f for f in tracked if f == dep or f.startswith(dep + "/")]
        assert files, f"dvc.yaml depends on {dep}: no stage writes it and git does not track it"
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, tmp / f)
    for out in outs:  # `repro --dry` runs nothing, yet wants each stage's deps on disk
        (tmp / out).parent.mkdir(parents=True, exist_ok=True)
        (tmp / out).write_text("placeholder")
    return tmp


def planned(cwd: Path, *targets: str) -> list[str]:
    """The stages ``dvc repro --dry`` would run, in order."""
    text = dvc(cwd, "repro", "--dry", *targets)
    return [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]


def own_model(params: dict) -> None:
    params["prepare"]["model"] = {"source": "/data/models/my-llm", "name": "my-llm-7b"}
    q = params["quantize"]["variants"]
    params["quantize"]["variants"] = {
        "gptq-int4": q["gptq-int4"],
        "int8": {"method": "gptq", "bits": 8, "group_size": 128, "symmetric": True},
        "int2": {"method": "gptq", "bits": 2, "group_size": 128, "symmetric": True, "serve": False},
    }
    params["shard"]["tensor_parallel_size"] = 2


@pytest.fixture(scope="module")
def swapped(tmp_path_factory) -> Path:
    return project_copy(tmp_path_factory.mktemp("own-model"), own_model)


def test_another_variant_list_and_tp_size_plan_their_own_stages_and_paths(swapped):
    stages = planned(swapped)
    assert set(stages) == {
        "prepare", "shard", "loadtest", "report", "evaluate-base", "speed",
        "quantize@gptq-int4", "quantize@int8", "quantize@int2",
        "evaluate@gptq-int4", "evaluate@int8", "evaluate@int2",  # int2 writes a "not evaluated" report
    }
    assert stages.index("prepare") == 0 and stages[-1] == "report"
    outs = dvc(swapped, "dag", "--outs", "--md")
    assert '"models/base-tp2"' in outs and "tp1" not in outs
    for v in ("gptq-int4", "int8", "int2"):
        assert f'"models/{v}"' in outs and f'"reports/quantize/{v}.json"' in outs
    assert "awq-int4" not in outs


def test_load_test_waits_for_every_listed_variant_and_nothing_else(swapped):
    assert set(planned(swapped, "loadtest")) == {
        "prepare", "quantize@gptq-int4", "quantize@int8", "quantize@int2", "loadtest"}


def test_the_code_reads_the_same_swapped_list_name_and_tp(swapped):
    params = load_params(swapped / "params.yaml")
    assert params.evaluate.variants == ["gptq-int4", "int8"]
    assert params.loadtest.variants == ["base", "gptq-int4", "int8"]
    assert params.report.variants == ["base", "gptq-int4", "int8", "int2"]
    assert {params.serve.chat.served_name, params.evaluate.server.served_name,
            params.shard.server.served_name, params.loadtest.server.served_name} == {"my-llm-7b"}
    assert params.shard.out_path == "models/base-tp2"


def test_only_metrics_json_is_a_dvc_metric():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    metrics = [next(iter(m)) if isinstance(m, dict) else m
               for s in stages.values() for m in (s.get("do", s).get("metrics") or [])]
    assert metrics == ["metrics.json"]
