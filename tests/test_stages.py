"""The stage registry (workbench/stages.py): the CLI, the DVC runner and the GPU runner take their
wiring from it, and a stage's variant is one config field that names the report and the MLflow run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from workbench import cli, stages, tracking
from workbench.reports import Report, read_report, write_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracked(monkeypatch) -> list[tuple[str, str, str]]:
    """MLflow replaced by a recorder: (run name's stage, its variant, the logged report's path)."""
    seen: list = []

    class Run:
        active = True

        def __init__(self, stage, variant):
            self.name = (stage, variant)

        def log_report(self, report, artifacts=()):
            seen.append((*self.name, str(report.path)))

        def log_artifact(self, *a, **k):
            pass

    @contextlib.contextmanager
    def stage_run(stage, variant, *args, **kwargs):
        yield Run(stage, variant)

    monkeypatch.setattr(tracking, "stage_run", stage_run)
    return seen


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """Every stage module's run(cfg) replaced: it records its config and writes a report named
    from it, as the real ones do."""
    monkeypatch.chdir(tmp_path)
    calls: dict[str, object] = {}
    for name, stage in stages.STAGES.items():
        module = stage.load() if name != "quantize" else pytest.importorskip("workbench.quantize")

        def run(cfg, _name=name, _module=module):
            calls[_name] = cfg
            report = Report(stage=_name, variant=getattr(cfg, "variant", None) or _module.VARIANT,
                            config=cfg.model_dump(mode="json"))
            write_report(report)
            return report

        monkeypatch.setattr(module, "run", run)
        monkeypatch.delattr(module, "track", raising=False)
    return calls


def params(tmp_path, text: str = "") -> str:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name", ["evaluate", "quantize"])
def test_cli_evaluate_and_quantize_run_the_stage_on_the_given_variant(name, fake_runs, tracked, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(stages.Stage, "missing", lambda self: [])  # llm-compressor lives in .venv-quant
    assert cli.main([name, "--variant", "gptq-int4", "--params", params(tmp_path)]) == 0
    assert fake_runs[name].variant == "gptq-int4"
    assert tracked == [(name, "gptq-int4", f"reports/{name}/gptq-int4.json")]


def test_cli_quantize_without_llmcompressor_names_the_environment_to_use(fake_runs, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(stages.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["quantize", "--variant", "gptq-int4", "--params", params(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llmcompressor" in err and ".venv-quant" in err
    assert "quantize" not in fake_runs


def test_cli_quantize_names_an_unknown_variant_before_any_work(fake_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stages.Stage, "missing", lambda self: [])
    assert cli.main(["quantize", "--variant", "gptq-in4", "--params", params(tmp_path)]) == 2
    assert "gptq-in4" in capsys.readouterr().err and "quantize" not in fake_runs


def test_shard_mlflow_run_and_report_follow_shard_variant_from_params(fake_runs, tracked, tmp_path):
    # Before: the CLI logged "shard:base" whatever shard.variant said, the report used cfg.variant.
    assert cli.main(["shard", "--params", params(tmp_path, "shard:\n  variant: awq-int4\n")]) == 0
    assert tracked == [("shard", "awq-int4", "reports/shard/awq-int4.json")]
    assert read_report("reports/shard/awq-int4.json").config["variant"] == "awq-int4"


def test_shard_variant_flag_overrides_params_for_run_report_and_mlflow_alike(fake_runs, tracked, tmp_path):
    text = "shard:\n  variant: awq-int4\n"
    assert cli.main(["shard", "--variant", "gptq-int4", "--params", params(tmp_path, text)]) == 0
    assert fake_runs["shard"].variant == "gptq-int4"
    assert tracked == [("shard", "gptq-int4", "reports/shard/gptq-int4.json")]


def test_stages_that_do_not_fan_out_take_no_variant_flag(tmp_path, capsys):
    from pipelines import run_stage

    with pytest.raises(SystemExit):
        cli.main(["prepare", "--variant", "x", "--params", params(tmp_path)])
    assert run_stage.main(["report", "--variant", "x", "--params", params(tmp_path)]) == 2
    assert "does not fan out" in capsys.readouterr().err


def test_loadtest_without_variant_is_the_compared_run_and_with_one_is_that_variant(fake_runs, tracked, tmp_path):
    assert cli.main(["loadtest", "--params", params(tmp_path)]) == 0
    assert cli.main(["loadtest", "--variant", "base", "--params", params(tmp_path)]) == 0
    assert [t[:2] for t in tracked] == [("loadtest", "all"), ("loadtest", "base")]


def test_dvc_runner_executes_the_registry_notebook_with_the_variant_in_its_config(tracked, tmp_path,
                                                                                 monkeypatch):
    import papermill

    from pipelines import run_stage

    monkeypatch.chdir(tmp_path)
    executed = {}

    def execute_notebook(src, dest, parameters, kernel_name, **kwargs):
        executed.update(src=src, kernel=kernel_name, config=parameters["config"], keys=set(parameters))
        cfg = parameters["config"]
        write_report(Report(stage="quantize", variant=cfg["variant"], config=cfg))
        Path(dest).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    out = run_stage.run_notebook("quantize", "gptq-int4", str(ROOT / "params.yaml"), [])
    spec = stages.STAGES["quantize"]
    assert executed["src"] == str(Path("notebooks") / spec.notebook) and executed["kernel"] == spec.kernel
    assert executed["keys"] == {"config"} and executed["config"]["variant"] == "gptq-int4"
    assert out == Path("runs/notebooks/02_quantize-gptq-int4.ipynb") and out.exists()
    assert tracked == [("quantize", "gptq-int4", "reports/quantize/gptq-int4.json")]


def test_cli_and_dvc_runner_share_one_registry(monkeypatch):
    import argparse

    from pipelines import run_stage

    offered: dict[str, set] = {}

    class Parsed(Exception):
        pass

    def parse_args(self, *a, **k):  # stop each entry point once its parser is built
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                offered["cli"] = set(action.choices)
            elif action.dest == "stage":
                offered["run_stage"] = set(action.choices)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    for main in (cli.main, run_stage.main):
        with pytest.raises(Parsed):
            main([])
    assert offered["run_stage"] == set(stages.STAGES) <= offered["cli"]
    assert run_stage.STAGES is stages.STAGES and cli.STAGES is stages.STAGES


def test_every_registered_stage_has_its_notebook_and_module():
    for stage in stages.STAGES.values():
        assert (ROOT / "notebooks" / stage.notebook).is_file(), stage.name
        path = ROOT / stage.module.replace(".", "/")  # a module, or a package (evaluate, quantize)
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), stage.name
        assert callable(stage.load().run), stage.name


def test_the_variant_is_read_from_config_in_every_notebook_not_passed_beside_it():
    import json

    for stage in stages.STAGES.values():
        nb = json.loads((ROOT / "notebooks" / stage.notebook).read_text())
        source = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert ".run(cfg)" in source, stage.name
        assert "variant =" not in source and "for_variant" not in source, stage.name

