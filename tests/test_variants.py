"""One home for the variant layout and the variant names (workbench/variants.py, issue 29)."""

import ast
from pathlib import Path

import pytest
import yaml

from workbench import variants
from workbench.config import ConfigError, EvaluateConfig, LoadtestConfig, QuantizeConfig, ShardConfig, load_params, \
    stage_config

ROOT = Path(__file__).resolve().parents[1]


def _literals(root: Path):
    """(file, line, text) of every string literal (and f-string's leading text) in root's code."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield path, node.lineno, node.value
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                yield path, node.lineno, str(node.values[0].value)


def test_no_module_but_variants_spells_the_models_folder_or_the_name_all():
    home = ROOT / "workbench/variants.py"
    found = [(str(p.relative_to(ROOT)), line, text) for d in ("workbench", "pipelines", "benchmarks")
             for p, line, text in _literals(ROOT / d)
             if p != home and (text.startswith(f"{variants.MODELS_ROOT}/") or text == variants.ALL)]
    assert not found, f"use workbench.variants (model_dir, sharded_dir, ALL): {found}"


def test_every_stage_finds_a_variant_folder_through_model_dir():
    assert EvaluateConfig(variant="q4").model_path == variants.model_dir("q4") == "models/q4"
    assert EvaluateConfig(variant="q4", model_dir="/elsewhere").model_path == "/elsewhere"
    shard = ShardConfig(variant="q4", tensor_parallel_size=3)
    assert (shard.source_path, shard.out_path) == ("models/q4", "models/q4-tp3")
    quant = QuantizeConfig(variant="gptq-int4")
    assert quant.out_path == variants.model_dir("gptq-int4")
    from workbench.loadtest.arms import server_config

    assert server_config(LoadtestConfig(), "q4").model_dir == "models/q4"
    assert server_config(LoadtestConfig(model_dir="/x"), "q4").model_dir == "/x"


def test_dvc_yaml_declares_the_layout_variants_derives():
    """dvc.yaml cannot import Python: its outputs are held to variants.py here."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert variants.model_dir("${key}") in stages["quantize"]["do"]["outs"]
    assert variants.sharded_dir("${shard.variant}", "${shard.tensor_parallel_size}") in stages["shard"]["outs"]
    assert variants.model_dir(variants.BASE) in stages["prepare"]["outs"]
    assert f"reports/report/{variants.ALL}.json" in stages["report"]["outs"]


def test_quantize_out_root_is_refused_with_the_reason_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'quantize.out_root' in .* is no longer a setting.*models/<variant>"):
        load_params(ROOT / "params.yaml", ["quantize.out_root=/tmp/elsewhere"])
    with pytest.raises(ConfigError, match=r"'quantize.out_root' .* no longer a setting"):  # the notebook's path
        stage_config("quantize", {"out_root": "models"})
    with pytest.raises(ConfigError, match="unknown key 'quantize.out_rot'"):  # other typos as before
        load_params(ROOT / "params.yaml", ["quantize.out_rot=x"])


def test_the_all_reports_share_one_name():
    from workbench import deploy, loadtest, report
    from workbench.reports import report_path

    assert report.VARIANT == loadtest.VARIANT == variants.ALL
    assert deploy.REPORT == report_path("report", variants.ALL)


def test_report_baseline_is_evaluate_baseline():
    params = load_params(ROOT / "params.yaml", ["evaluate.baseline=gptq-int4"])
    assert params.report.baseline == "gptq-int4"
    assert load_params(ROOT / "params.yaml").report.baseline == variants.BASE
    assert load_params(ROOT / "params.yaml", ["evaluate.baseline=null"]).report.baseline is None
    with pytest.raises(ConfigError, match="evaluate.baseline"):  # a second home is refused
        load_params(ROOT / "params.yaml", ["report.baseline=awq-int4"])
    # the notebook receives the section with it filled in
    assert stage_config("report", params.report.model_dump(mode="json")).baseline == "gptq-int4"
