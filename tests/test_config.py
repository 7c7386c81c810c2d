import subprocess
import sys

import pytest

from workbench.config import ConfigError, load_params, stage_config


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_unknown_param_key_names_the_key(tmp_path):
    p = write(tmp_path, "prepare:\n  modle:\n    source: x\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    assert "prepare.modle" in str(err.value)
    assert "did you mean 'model'" in str(err.value)


def test_unknown_nested_key_names_the_full_path(tmp_path):
    p = write(tmp_path, "serve:\n  chat:\n    tensor_paralel_size: 2\n")
    with pytest.raises(ConfigError, match=r"serve\.chat\.tensor_paralel_size.*tensor_parallel_size"):
        load_params(p)


def test_unknown_section_names_the_section(tmp_path):
    p = write(tmp_path, "prepar: {}\n")
    with pytest.raises(ConfigError, match="'prepar'.*did you mean 'prepare'"):
        load_params(p)


def test_bad_value_names_key_and_value(tmp_path):
    p = write(tmp_path, "prepare:\n  dtype: float8\n")
    with pytest.raises(ConfigError, match=r"prepare\.dtype.*float8"):
        load_params(p)


def test_cli_override_beats_params_file_beats_default(tmp_path):
    p = write(tmp_path, "prepare:\n  dtype: float16\n  out_dir: here\n")
    params = load_params(p, ["prepare.dtype=float32"])
    assert params.prepare.dtype == "float32"  # CLI
    assert params.prepare.out_dir == "here"  # params.yaml
    assert params.prepare.embedding_out_dir == "models/embed"  # default


def test_override_with_unknown_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="prepare.dtyp"):
        load_params(write(tmp_path, ""), ["prepare.dtyp=float32"])


def test_stage_config_from_papermill_values_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="'bogus'"):
        stage_config("prepare", {"bogus": 1})


def test_repo_params_file_is_valid():
    params = load_params("params.yaml")
    assert params.prepare.model.source.startswith("pkg:")


def test_cli_check_fails_on_typo_before_any_work(tmp_path):
    p = write(tmp_path, "prepare:\n  out_dri: x\n")
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "prepare", "--params", str(p)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "prepare.out_dri" in out.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()


def test_pipeline_runner_fails_on_typo_before_running_the_notebook(tmp_path, project):
    (project / "params.yaml").write_text("prepare:\n  smoke_max_new_token: 3\n")
    out = subprocess.run([sys.executable, "-m", "pipelines.run_stage", "prepare"],
                         capture_output=True, text=True, cwd=project, timeout=120)
    assert out.returncode == 2
    assert "prepare.smoke_max_new_token" in out.stderr
    assert not (project / "runs").exists() and not (project / "mlflow.db").exists()
