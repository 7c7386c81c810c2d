"""The prepare stage for real: the embedded GGUF becomes a bf16 HF folder that still answers."""

import json

import pytest

from workbench import prepare
from workbench.config import ModelSource, PrepareConfig

pytestmark = pytest.mark.integration


def test_gguf_becomes_bf16_safetensors_with_tokenizer_and_chat_template(prepared):
    base = prepared["base"]
    names = {p.name for p in base.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((base / "config.json").read_text())


def test_report_records_params_bytes_dtype_architecture_and_hash(prepared):
    report = prepared["report"]
    model = report.details["model"]
    assert model["parameters"] == 134_515_008  # SmolLM2-135M, tied embeddings
    assert model["architecture"] == "LlamaForCausalLM" and model["dtype"] == "bfloat16"
    assert len(model["content"]["sha256"]) == 64
    assert model["content"]["bytes"] == sum(p.stat().st_size for p in prepared["base"].iterdir())
    assert report.data_fingerprint["model_source"]["kind"] == "gguf"
    assert report.details["embedding"]["embedding_dim"] == 384
    assert report.metrics["model_bytes"] > 2.5e8


def test_prepared_model_still_answers(prepared):
    assert "Paris" in prepared["report"].details["smoke"]["answer"]


def test_a_local_hf_folder_is_accepted_as_source(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = prepare.run(PrepareConfig(
        model=ModelSource(source=str(prepared["base"]), name="copy"), out_dir=str(tmp_path / "copy"),
        embedding=None, smoke_max_new_tokens=0))
    assert report.data_fingerprint["model_source"]["kind"] == "hf"
    assert report.details["model"]["parameters"] == 134_515_008
    assert (tmp_path / "reports" / "prepare" / "base.json").exists()
