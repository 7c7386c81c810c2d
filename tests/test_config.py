import subprocess
from pathlib import Path
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


# --- params.yaml and the code defaults are one set of values -----------------------------------

# Keys (dotted prefixes) where params.yaml may differ from the defaults in workbench/config/,
# each with the reason. Everything else must match, so a test that builds a config from the code
# defaults tests what the pipeline runs.
DEFAULTS_MAY_DIFFER = {
    # Filled from serve.chat by Params' validator when params.yaml has no loadtest.server; the
    # code default is a plain ServerConfig(), the pipeline's value is whatever serve.chat holds.
    "loadtest.server": "a copy of serve.chat",
}


def _leaves(data, prefix=""):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.removesuffix("."), data


def _differences(params) -> dict[str, tuple]:
    from workbench.config import Params

    ran, code = dict(_leaves(params.model_dump(mode="json"))), dict(_leaves(Params().model_dump(mode="json")))
    return {k: (ran.get(k, "<absent>"), code.get(k, "<absent>")) for k in ran.keys() | code.keys()
            if ran.get(k, "<absent>") != code.get(k, "<absent>")
            and not any(k == p or k.startswith(p + ".") for p in DEFAULTS_MAY_DIFFER)}


def test_params_file_equals_the_code_defaults():
    diffs = _differences(load_params("params.yaml"))
    assert not diffs, ("params.yaml and workbench/config/ disagree (params.yaml, code): "
                       f"{dict(sorted(diffs.items()))}; change one to match, or add the key to "
                       "DEFAULTS_MAY_DIFFER with the reason")


def test_defaults_check_notices_a_changed_value_in_any_section(tmp_path):
    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    data["evaluate"]["mmlu"]["num_fewshot"] = 0
    data["report"]["variants"] = ["base"]
    p = write(tmp_path, yaml.safe_dump(data, sort_keys=False))  # quantize.variants order is the variant order
    assert set(_differences(load_params(p))) == {"evaluate.mmlu.num_fewshot", "report.variants"}


def test_every_section_is_compared():
    from workbench.config import Params

    leaves = {k.split(".")[0] for k, _ in _leaves(load_params("params.yaml").model_dump(mode="json"))}
    assert leaves == set(Params.model_fields) == {
        "project", "prepare", "serve", "loadtest", "evaluate", "quantize", "shard", "report", "deploy", "speed"}


# --- your model in one place: the served name and the variant lists have one home each ----------

def test_served_name_follows_prepare_model_name_unless_a_section_sets_its_own():
    params = load_params("params.yaml", ["prepare.model.name=my-llm", "prepare.embedding.name=my-embed"])
    assert {params.serve.chat.served_name, params.evaluate.server.served_name,
            params.shard.server.served_name, params.loadtest.server.served_name} == {"my-llm"}
    assert params.serve.embedding.served_name == "my-embed"
    own = load_params("params.yaml", ["prepare.model.name=my-llm", "evaluate.server.served_name=other"])
    assert own.evaluate.server.served_name == "other" and own.serve.chat.served_name == "my-llm"
    # the notebook gets the section alone: the derived name travels in it
    section = stage_config("shard", params.shard.model_dump(mode="json"))
    assert section.server.served_name == "my-llm"


def test_params_yaml_holds_no_copy_of_the_model_name_or_the_variant_lists():
    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    assert data["serve"]["chat"]["served_name"] is None
    assert data["evaluate"]["server"]["served_name"] is None and data["shard"]["server"]["served_name"] is None
    assert data["evaluate"]["variants"] is None and data["loadtest"]["variants"] is None
    assert data["report"]["variants"] is None


def test_variant_lists_follow_quantize_variants_and_their_serve_flag(tmp_path):
    p = write(tmp_path, "quantize:\n  variants:\n    q8: {method: gptq, bits: 8}\n"
                        "    q2: {method: gptq, bits: 2, serve: false}\n    q4: {method: gptq}\n")
    params = load_params(p)
    assert params.evaluate.variants == ["q8", "q4"]
    assert params.loadtest.variants == ["base", "q8", "q4"]  # the order of quantize.variants
    assert params.report.variants == ["base", "q8", "q2", "q4"]
    assert load_params(p, ["loadtest.variants=[q4, base]"]).loadtest.variants == ["q4", "base"]


def test_evaluate_variant_outside_quantize_variants_is_an_error_naming_the_list(tmp_path):
    p = write(tmp_path, "quantize:\n  variants:\n    q8: {method: gptq, bits: 8}\n")
    with pytest.raises(ConfigError, match=r"evaluate.variants \['q4'\].*quantize.variants \['q8'\]"):
        load_params(p, ["evaluate.variants=[q4]"])


ARMS = ("loadtest:\n  arms:\n    - {kind: llamacpp, name: gguf, server: {threads: 1}}\n"
        "    - {kind: url, name: hosted, base_url: 'http://h:1/v1', model: m, api_key_env: K}\n"
        "    - {kind: vllm, name: tuned, variant: q8}\n"
        "quantize:\n  variants:\n    q8: {method: gptq, bits: 8}\n")


def test_a_loadtest_arm_is_evaluated_as_the_load_test_reaches_it(tmp_path):
    p = write(tmp_path, ARMS)
    assert load_params(p).evaluate.variants == ["q8", "gguf", "hosted", "tuned"]  # arms evaluated by default
    gguf = load_params(p, ["evaluate.variant=gguf"]).evaluate
    assert (gguf.backend, gguf.fallback_backend, gguf.chat.server, gguf.chat.endpoint) == ("chat", None, "llamacpp", None)
    assert gguf.chat.llamacpp.threads == 1  # the arm's own server settings, not evaluate's defaults
    hosted = load_params(p, ["evaluate.variant=hosted"]).evaluate
    assert (hosted.backend, hosted.chat.endpoint, hosted.chat.model, hosted.chat.api_key_env) == (
        "chat", "http://h:1/v1", "m", "K")
    tuned = load_params(p, ["evaluate.variant=tuned"]).evaluate
    assert tuned.backend == "vllm" and tuned.model_path == "models/q8"  # its variant's folder
    base = load_params(p, ["evaluate.variant=base"]).evaluate
    assert base.backend == "vllm" and base.chat.endpoint is None  # a variant is left as configured


def test_evaluate_variants_may_name_loadtest_arms_but_nothing_else(tmp_path):
    p = write(tmp_path, ARMS)
    assert load_params(p, ["evaluate.variants=[hosted]"]).evaluate.variants == ["hosted"]
    with pytest.raises(ConfigError, match=r"evaluate.variants \['other'\].*loadtest.arms \['gguf', 'hosted', 'tuned'\]"):
        load_params(p, ["evaluate.variants=[other]"])


def test_a_server_built_outside_params_yaml_serves_under_its_folder_name():
    from workbench.config import ServerConfig
    from workbench.serve import VLLMServer, build_command

    cfg = ServerConfig(model_dir="models/gptq-int4")
    assert "--served-model-name gptq-int4" in " ".join(build_command(cfg, 8000, "cpu"))
    assert VLLMServer(cfg, log_path=Path("unused.log")).cfg.served_name == "gptq-int4"


def test_gateway_example_routes_the_served_names_params_yaml_derives():
    import yaml

    params = load_params("params.yaml")
    gateway = yaml.safe_load((Path(__file__).parents[1] / "deploy/gateway.yaml").read_text())
    assert {params.serve.chat.served_name, params.serve.embedding.served_name} <= set(gateway["upstreams"])
