"""The real llama.cpp server (workbench.llamacpp) on the embedded default's GGUF, through the
official openai SDK: starts, answers chat (also streamed), completions with log-probs, stops."""

import socket
import time

import openai
import psutil
import pytest

from workbench.config import LlamaCppConfig
from workbench.llamacpp import LlamaCppServer, build_command, model_path
from workbench.managed import ServerError

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def client(llamacpp_server):
    return openai.OpenAI(base_url=llamacpp_server.base_url, api_key="unused", max_retries=0)


def test_default_model_is_the_gguf_prepare_reads_from_its_package():
    from workbench.config import PrepareConfig
    from workbench.sources import resolve

    assert LlamaCppConfig().model == PrepareConfig().model.source
    assert model_path(LlamaCppConfig().model) == resolve(PrepareConfig().model.source).path


def test_command_carries_threads_context_and_slots():
    cmd = build_command(LlamaCppConfig(threads=3, ctx_size=512, parallel=4, served_name="m"),
                        model_path(LlamaCppConfig().model), 8123)
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert cmd[1:3] == ["-m", "workbench.llamacpp"]
    assert flags["--threads"] == "3" and flags["--ctx-size"] == "512" and flags["--parallel"] == "4"
    assert flags["--alias"] == "m" and flags["--port"] == "8123"


@integration
def test_models_lists_the_served_name(client, llamacpp_server):
    assert llamacpp_server.served_name in [m.id for m in client.models.list()]


@integration
def test_chat_answers_with_usage(client, llamacpp_server):
    r = client.chat.completions.create(
        model=llamacpp_server.served_name, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "Which city is the capital of France?"}])
    assert r.choices[0].message.content.strip()
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


@integration
def test_streamed_chat_arrives_as_several_sse_chunks(client, llamacpp_server):
    stream = client.chat.completions.create(
        model=llamacpp_server.served_name, stream=True, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "Count from one to ten."}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces).strip()


@integration
def test_completion_returns_log_probs_of_generated_tokens_only(client, llamacpp_server):
    """llama.cpp returns the log-probs of what it generates, never of the prompt (it ignores echo:
    llama.cpp issue 27174): the probe evaluate uses says so, and perplexity is not asked of it."""
    from workbench.evaluate.chat import prompt_logprobs_unavailable

    r = client.completions.create(model=llamacpp_server.served_name, prompt="The capital of France is",
                                  max_tokens=2, temperature=0, logprobs=2)
    content = r.choices[0].logprobs.model_extra.get("content") or []
    assert len(content) == 2 and all(c["logprob"] <= 0 for c in content)
    reason = prompt_logprobs_unavailable(llamacpp_server.base_url, llamacpp_server.served_name)
    assert reason and "prompt" in reason


@integration
def test_stop_leaves_no_process_and_frees_the_port(tmp_path):
    server = LlamaCppServer(LlamaCppConfig(), log_path=tmp_path / "llamacpp.log")
    with server:
        pids = {server.proc.pid, *(c.pid for c in psutil.Process(server.proc.pid).children(recursive=True))}
        port = server.port
    time.sleep(0.2)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert "llama.cpp server stopped" in (tmp_path / "llamacpp.log").read_text()


@integration
def test_missing_model_file_fails_fast_naming_the_file_with_the_log_tail(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    t0 = time.perf_counter()
    with pytest.raises(ServerError) as err:
        with LlamaCppServer(LlamaCppConfig(model=str(missing)), log_path=tmp_path / "log"):
            pass
    message = str(err.value)
    assert "llama.cpp exited with code 2" in message and "last lines of" in message
    assert f"GGUF model file not found: {missing}" in message
    assert time.perf_counter() - t0 < 60
