"""The GPU orchestration path, on the CPU: a profile merged into params.yaml (pipelines/gpu/overlay.py),
the DVC stage's run of it, what pipelines/gpu/repro.sh returns from a GPU host, and the import of that
into MLflow and results/ (pipelines/gpu/import_results.py, summary.py, tables.py, redis-bundle.sh).
The serving-configuration comparison (params-serving-configs.yaml) runs against fake servers
standing in for its vLLMs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.gpu import import_results, overlay, summary
from workbench import loadtest, stats, tracking
from workbench.config import deep_merge, load_params
from workbench.loadgen.knee import KneeResult, Probe
from workbench.reports import read_report
from workbench.stages import STAGES
from workbench.testing.fakeserver import FakeServer, fake_endpoints

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "pipelines/gpu"
SERVING = GPU / "params-serving-configs.yaml"
# The profile's load at CPU scale: a p50 SLO so that 24 requests decide a probe, one-token replies.
CPU_SCALE = {"client_processes": 1, "window": "schedule", "duration_s": None, "requests_per_step": 24,
             "warmup_requests": 0, "arrival": "constant", "scrape_metrics": False, "repeats": 1,
             "max_duration_s": None, "steady_state": {"min_requests": 24},
             "workload": {"input_tokens": 8, "output_tokens": 1, "max_tokens": 1},
             "slo": {"ttft_ms": 40, "ttft_percentile": 50, "min_goodput": 0.5},
             "knee": {"start_req_per_s": 40, "min_req_per_s": 5, "tolerance": 0.2, "max_probes": 5,
                      "max_repeats": 1}}


def merged_params(profile: Path, folder: Path):
    """params.yaml with ``profile`` merged by the overlay, as repro.sh does before `dvc repro`."""
    params = folder / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert overlay.main([str(profile), "--params", str(params)]) == 0
    return load_params(params)


def repro_wait(run: Path, out: Path) -> subprocess.CompletedProcess:
    """repro.sh's `wait` on a finished run in ``run``: what it returns from a GPU host, into ``out``."""
    state = run / "runs/gpu-repro-state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "repro.log").write_text("Running stage 'loadtest':\n")
    finished = subprocess.Popen(["true"])
    finished.wait()
    (state / "pid").write_text(f"{finished.pid}\n")
    env = {**os.environ, "WAIT_S": "0", "RESULTS": str(out)}
    return subprocess.run(["bash", str(GPU / "repro.sh"), "wait"], cwd=run, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def serving_run(tmp_path_factory):
    """params-serving-configs.yaml through the DVC path's config and the loadtest stage's run(cfg),
    against fakes of capacities ~100, ~200 and ~200 req/s (one or two requests at a time, 10 ms
    each); then repro.sh's returned archive, imported into MLflow and results/ as on a laptop."""
    tmp = tmp_path_factory.mktemp("gpu")
    params = merged_params(SERVING, tmp)
    cfg = params.loadtest.model_validate(deep_merge(params.loadtest.model_dump(), CPU_SCALE))
    names = list(cfg.variants)
    fakes = {n: FakeServer(max_running=1 if i == 0 else 2, ttft_ms=10, itl_ms=0, output_tokens=1,
                           model=params.serve.chat.served_name) for i, n in enumerate(names)}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        started = fake_endpoints(mp, fakes)
        STAGES["loadtest"].run(cfg)
        returned = repro_wait(tmp, tmp / "out")
        assert returned.returncode == 0, returned.stderr
        assert import_results.main([str(tmp / "out/results.tar.gz"), "--results", "results/gpu"]) == 0
        store = tracking.tracking_uri()  # the store import_results logged into (this folder's)
    return {"dir": tmp, "cfg": cfg, "names": names, "started": started, "results": tmp / "results/gpu",
            "store": store}


def test_every_gpu_profile_is_params_keys_that_validate_over_params_yaml():
    """One orchestration path: every YAML file in pipelines/gpu is a profile the overlay merges into
    params.yaml and checks (a plan of its own, with an SLO and a workload of its own, is not)."""
    profiles = sorted(GPU.glob("*.yaml"))
    assert SERVING in profiles and len(profiles) >= 4
    for profile in profiles:
        assert overlay.main([str(profile), "--params", str(ROOT / "params.yaml"), "--check"]) == 0, profile.name
    assert not (GPU / "gpu_run.py").exists() and not (GPU / "plan.yaml").exists()


def test_a_profile_names_the_variants_of_its_run_and_merging_it_twice_changes_nothing(tmp_path):
    """params-gpu2.yaml removes gptq-int3 (quantize.variants.<name>: null): the variants the H200 runs
    compared, once given as repro.sh's VARIANTS knob, now written in the profile."""
    params = merged_params(GPU / "params-gpu.yaml", tmp_path)
    assert "gptq-int3" in params.quantize.variants
    assert overlay.main([str(GPU / "params-gpu2.yaml"), "--params", str(tmp_path / "params.yaml")]) == 0
    once = (tmp_path / "params.yaml").read_text()
    assert list(load_params(tmp_path / "params.yaml").quantize.variants) == [
        "awq-int4", "autoawq-int4", "gptq-int4", "fp8-dynamic"]
    assert "gptq-int3" not in once and "# The embedded default" in once  # removed, comments kept
    assert overlay.main([str(GPU / "params-gpu2.yaml"), "--params", str(tmp_path / "params.yaml")]) == 0
    assert (tmp_path / "params.yaml").read_text() == once
    with pytest.raises(SystemExit, match="removes quantize.variants gptq-int3"):
        overlay.main([str(GPU / "params-gpu2.yaml"), "--set-args"])


def test_repro_refuses_the_variants_knob_the_profile_replaced(tmp_path):
    run = tmp_path / "run"
    fake_gpu_host(run)
    res = repro(run, "start", WAIT_S="0", VARIANTS="gptq-int4")
    assert res.returncode == 2 and "VARIANTS is no longer read" in res.stderr
    assert not (run / "runs/gpu-repro-state/pid").exists()  # nothing started


def test_serving_configs_profile_is_one_knee_comparison_of_one_model_whose_probes_can_decide_a_p99(tmp_path):
    cfg = merged_params(SERVING, tmp_path).loadtest
    profile = yaml.safe_load(SERVING.read_text())["loadtest"]
    assert cfg.variants == ["api1", "api4", "api4-async"] and cfg.server_overrides == profile["server_overrides"]
    assert cfg.mode == "knee" and cfg.order == "randomized" and cfg.repeats >= 3 and cfg.client_processes == 4
    assert cfg.base_url is None and cfg.variant is None  # managed servers, one per configuration, compared
    assert (cfg.slo.ttft_ms, cfg.slo.ttft_percentile, cfg.slo.min_goodput) == (300, 99, 0.99)
    # a p99 at the limit, every request under it: shown to pass from 299 independent requests on,
    # but requests are autocorrelated: the profile asks for ~16 above the p99 (see the H100 test below)
    n = cfg.steady_state.min_requests
    assert stats.quantile_within([1.0] * n, 300, 99) is stats.Verdict.passed
    assert n * (1 - cfg.slo.ttft_percentile / 100) >= 16
    servers = [loadtest.server_config(cfg, v) for v in cfg.variants]
    assert [s.api_server_count for s in servers] == [1, 4, 4] and servers[2].async_scheduling
    assert {s.model_dir for s in servers} == {"models/base"}  # one model, its configurations compared
    assert sum(s.gpu_memory_utilization for s in servers) <= 0.9  # all up together on one GPU


def test_serving_configs_run_in_blocks_with_the_control_named(serving_run):
    names = serving_run["names"]
    assert serving_run["started"] == names  # one server per configuration, in the profile's order
    comparison = read_report(serving_run["dir"] / "reports/loadtest/all.json")
    order = comparison.details["order"]
    assert sorted(o["variant"] for o in order[:len(names)]) == sorted(names)  # every configuration in block 0
    assert {o["block"] for o in order[:len(names)]} == {0}
    assert comparison.details["drift"]["control"] == names[0]
    for name in names:
        rep = read_report(serving_run["dir"] / f"reports/loadtest/{name}.json")
        assert rep.config["server_overrides"][name] == serving_run["cfg"].server_overrides[name]
        assert rep.metrics["sustained_req_per_s_ci_lo"] <= rep.metrics["sustained_req_per_s_ci_hi"]


def test_imported_summary_shows_each_sustained_rate_with_its_bracket_the_table_with_intervals_and_the_drift(
        serving_run):
    md = (serving_run["results"] / "summary.md").read_text()
    comparison = read_report(serving_run["dir"] / "reports/loadtest/all.json")
    for name in serving_run["names"]:
        rep = read_report(serving_run["dir"] / f"reports/loadtest/{name}.json")
        bracket = KneeResult.model_validate(rep.details["knee"]).text()
        assert f"| {bracket} |" in md and "[" in bracket  # sustained rate with its [passed, failed)
        ttft_p50 = loadtest.rates_of(rep)[0].latency["ttft"].at(50)
        assert ttft_p50.lo is not None and ttft_p50.text(".0f") in md  # the table's figures carry intervals
        assert f"### {name}: probes " in md
    assert "| api4 | api_server_count=4, engine_core_nice=-10" in md  # each configuration's serve keys
    assert "TTFT p50 ms" in md and "goodput" in md
    assert comparison.details["drift"]["verdict"] in md and "**Drift control**" in md
    assert "**Comparison**: paired within counterbalanced blocks" in md
    assert "TTFT p50 <= 40 ms and goodput >= 50%" in md  # the SLO as the run's config had it


def test_import_logs_each_configuration_and_the_comparison(serving_run):
    import mlflow

    assert (serving_run["results"] / "loadtest/all.json").exists()
    client = mlflow.MlflowClient(tracking_uri=serving_run["store"])
    exp = client.get_experiment_by_name("llm-workbench")
    stage_runs = {r.info.run_name: r
                  for r in client.search_runs([exp.experiment_id], "tags.`workbench.role` = 'stage'")}
    names = serving_run["names"]
    assert set(stage_runs) == {f"loadtest:gpu-{n}" for n in names} | {"loadtest:gpu-all"}
    for name in names:
        rep = read_report(serving_run["dir"] / f"reports/loadtest/{name}.json")
        metrics = stage_runs[f"loadtest:gpu-{name}"].data.metrics
        assert metrics["sustained_req_per_s"] == rep.metrics["sustained_req_per_s"]
        assert metrics["sustained_req_per_s_ci_hi"] == rep.metrics["sustained_req_per_s_ci_hi"]
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = "
                                      f"'{stage_runs[f'loadtest:gpu-{name}'].info.run_id}'")
        assert len(children) == len(rep.details["steps"])  # one nested run per step, none twice
    comparison = stage_runs["loadtest:gpu-all"]
    assert comparison.data.metrics == read_report(serving_run["dir"] / "reports/loadtest/all.json").metrics
    assert [a.path for a in client.list_artifacts(comparison.info.run_id, "loadtest")] == ["loadtest/summary.md"]


def test_a_comparison_from_before_the_block_design_keeps_its_drift_gate_verdict():
    assert summary.comparison_verdict({"drifted": True, "verdict": "drift"}).startswith("INVALID")
    assert summary.comparison_verdict({"control": "a", "points": {}, "verdict": "x"}).startswith("paired")


def searched(**verdicts: list[float]) -> KneeResult:
    probes = [Probe(rate=r, verdict=stats.Verdict(v), repeats=1) for v, rs in verdicts.items() for r in rs]
    return KneeResult(sustained_req_per_s=None, lo=None, hi=None, converged=False, hi_undecided=False,
                      tolerance=0.1, probes=probes, note="")


def test_an_arm_differs_from_the_control_only_where_one_passed_a_rate_the_other_was_shown_to_fail():
    control = searched(**{"pass": [50, 100], "fail": [200], "undecided": [141]})
    assert summary.against_control(searched(**{"pass": [50, 100, 200]}), control).startswith("higher")
    assert summary.against_control(searched(**{"pass": [50], "fail": [100]}), control).startswith("lower")
    assert summary.against_control(searched(**{"pass": [50, 100, 141], "undecided": [200]}),
                                   control).startswith("not resolved")  # 141 undecided for the control
    assert summary.against_control(searched(**{"pass": [50, 100], "fail": [200]}), control).startswith("not resolved")


def test_gpu_tables_render_every_variant_and_the_recommended_steps_from_a_runs_reports(tmp_path):
    """pipelines/gpu/tables.py on the reports of the committed CUDA run (results/gpu-cuda)."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "results/gpu-cuda/reports", tmp_path / "reports")
    out = subprocess.run([sys.executable, "-m", "pipelines.gpu.tables", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "| base | reference | 272.6 (1.000) | 12.24 [12.16, 12.33] |" in text
    assert "| gptq-int4 | gptq | 116.7 (0.428) | n/a | n/a | n/a |" in text  # not evaluated in that run
    assert "## Recommendation: base" in text
    assert "| 80 | rate_80 (measure) | 83.4 | 45.7 [44.1, 47.0] |" in text
    assert "changed between the start and the end" in text  # that run's drift verdict


def test_repro_returns_its_results_as_files_a_leased_machine_can_send_back(tmp_path):
    """repro.sh's results, also of a run that has not finished: few files, none over 16 MiB (what a
    leased GPU machine returns), the load test's raw records in parts that rebuild the archive."""
    run = tmp_path / "run"
    state = run / "runs/gpu-repro-state"
    state.mkdir(parents=True)
    (state / "repro.log").write_text("Running stage 'loadtest':\n")
    (state / "setup.log").write_text("[setup] ok\n")
    finished = subprocess.Popen(["true"])
    finished.wait()
    (state / "pid").write_text(f"{finished.pid}\n")
    (run / "reports/quantize").mkdir(parents=True)
    (run / "reports/quantize/a.json").write_text("{}")
    records = run / "runs/loadtest/a/step-100.jsonl"
    records.parent.mkdir(parents=True)
    records.write_bytes(os.urandom(20 * 2**20))  # incompressible: 20 MiB, two parts
    out = tmp_path / "out"
    env = {**os.environ, "WAIT_S": "0", "RESULTS": str(out)}
    res = subprocess.run(["bash", str(ROOT / "pipelines/gpu/repro.sh"), "wait"], cwd=run, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "FINISHED" in res.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["loadtest-records.tar.gz.part0", "loadtest-records.tar.gz.part1", "repro.log", "results.tar.gz"]
    assert all((out / f).stat().st_size <= 15 * 2**20 for f in files)
    listing = subprocess.run(["tar", "tzf", str(out / "results.tar.gz")], capture_output=True, text=True).stdout
    assert "reports/quantize/a.json" in listing and "runs/gpu-repro-state/setup.log" in listing
    joined = tmp_path / "records.tar.gz"
    joined.write_bytes(b"".join((out / f).read_bytes() for f in files if ".part" in f))
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(["tar", "xzf", str(joined), "-C", str(back)], check=True)
    assert (back / "runs/loadtest/a/step-100.jsonl").read_bytes() == records.read_bytes()


def test_redis_bundle_serves_with_the_libraries_it_carries(tmp_path):
    """What pipelines/gpu/redis-bundle.sh packs for a GPU host without apt: redis-server whose every
    library but the C library's is loaded from the bundle, started by its launcher, answering PING."""
    import shutil
    import socket
    import time

    from workbench.net import free_port

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; ./setup.sh does it)")
    archive = tmp_path / "redis.tar.gz"
    subprocess.run(["bash", str(ROOT / "pipelines/gpu/redis-bundle.sh"), str(archive)], check=True,
                   capture_output=True, timeout=60)
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["tar", "xzf", str(archive), "-C", str(host)], check=True)
    lib = host / "redis/lib"
    ldd = subprocess.run(["ldd", str(host / "redis/bin/redis-server")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(lib)}).stdout
    resolved = [line.split()[:3] for line in ldd.splitlines() if "=>" in line and "/" in line]
    assert resolved
    for name, _, path in resolved:
        if not name.startswith(("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux")):
            assert path.startswith(str(lib)), f"{name} would load from {path}, not the bundle"
    port = free_port()
    proc = subprocess.Popen([str(host / "redis/run.sh"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], env={"PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline, answer = time.monotonic() + 10, b""
        while not answer.startswith(b"+PONG") and time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    answer = s.recv(16)
            except OSError:
                time.sleep(0.05)
        assert answer.startswith(b"+PONG"), f"no PONG (exit code {proc.poll()})"
    finally:
        proc.terminate()
        proc.wait(10)


def fake_gpu_host(run: Path) -> None:
    """A repository folder whose setup and DVC only log what they are asked (repro.sh's seams):
    enough to follow repro.sh's own order of steps without installing anything."""
    (run / "runs/gpu-repro-state").mkdir(parents=True)
    (run / "setup.sh").write_text("#!/bin/sh\necho \"[setup] ok $*\"\n")
    (run / "setup.sh").chmod(0o755)
    fakebin = run / "fakebin"
    fakebin.mkdir()
    (fakebin / "dvc").write_text(f"#!/bin/sh\necho \"dvc $*\" >> {run}/dvc-calls.log\n")
    (fakebin / "dvc").chmod(0o755)
    (run / ".venv/bin").mkdir(parents=True)
    (run / ".venv/bin/activate").write_text(f"export PATH={fakebin}:$PATH\n")
    (run / "dvc.lock").write_text("schema: '2.0'\n")
    (run / ".gitignore").write_text("fakebin/\n.venv/\nruns/\ndvc-calls.log\nready\n")


def repro(run: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PROFILE": "none", "RESULTS": str(run / "out"), "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **env}
    return subprocess.run(["bash", str(ROOT / "pipelines/gpu/repro.sh"), *args], cwd=run, env=full,
                          capture_output=True, text=True, timeout=120)


def test_repro_waits_after_setup_for_carried_outputs_still_arriving_and_commits_them_once_in_place(tmp_path):
    """CARRIED_READY: setup starts while the carried outputs are still being copied to the host; the
    run uses them (dvc commit, then dvc repro) only after the file that marks them complete appears."""
    run = tmp_path / "run"
    fake_gpu_host(run)
    started = repro(run, "start", "--no-quant", WAIT_S="3", CARRIED="prepare quantize", CARRIED_READY="ready")
    assert "RUNNING" in started.stdout, started.stdout + started.stderr
    assert not (run / "dvc-calls.log").exists()  # set up, but waiting: nothing carried is used yet
    (run / "ready").touch()
    done = repro(run, "wait", WAIT_S="60")
    assert "FINISHED" in done.stdout
    log = (run / "runs/gpu-repro-state/repro.log").read_text()
    assert "--no-quant" in (run / "runs/gpu-repro-state/setup.log").read_text()
    assert "carried outputs in place" in log and "carried: prepare quantize up to date" in log
    assert (run / "dvc-calls.log").read_text().splitlines()[:2] == ["dvc commit -f prepare quantize", "dvc repro"]


def test_repro_stops_with_a_reason_when_carried_outputs_never_arrive(tmp_path):
    run = tmp_path / "run"
    fake_gpu_host(run)
    done = repro(run, "start", WAIT_S="60", CARRIED="prepare", CARRIED_READY="ready", CARRIED_WAIT_S="2")
    assert "FINISHED" in done.stdout
    assert "CARRIED: ready did not appear within 2s" in done.stdout  # in the log excerpt it prints
    assert not (run / "dvc-calls.log").exists()


def test_import_of_a_pipeline_runs_archive_names_its_gpu_and_keeps_the_reports_plots(tmp_path, monkeypatch):
    """repro.sh's results.tar.gz (stage reports, no runner summary): the summary names the GPU and vLLM
    from the reports' provenance, and the report stage's plots are kept beside its report."""
    import tarfile

    src = ROOT / "results/gpu-2"
    archive = tmp_path / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for stage in ("evaluate", "loadtest", "report"):
            tar.add(src / stage, arcname=f"reports/{stage}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert import_results.main([str(archive), "--results", "out"]) == 0
    assert (tmp_path / "out/summary.md").read_text().startswith("# GPU run: NVIDIA H200, 143771 MiB, vLLM 0.26.0\n")
    assert (tmp_path / "out/report/latency_vs_rate.png").read_bytes() == (src / "report/latency_vs_rate.png").read_bytes()


def test_gpu_tables_of_the_h200_run_show_every_variant_with_intervals_the_drift_and_the_gateway():
    """The committed H200 run (results/gpu-2): the tables its README quotes, rebuilt from its reports."""
    out = subprocess.run([sys.executable, "-m", "pipelines.gpu.tables", str(ROOT / "results/gpu-2")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == (ROOT / "results/gpu-2/tables.md").read_text()
    assert "| fp8-dynamic | fp8 | 166.8 (0.612) | 2.74 [2.64, 2.88] | 200 req/s [200, 400) (search not finished) |" \
        in out.stdout
    assert "## Recommendation: base" in out.stdout
    assert "| 200 | rate_200 (knee) | 194.2 | 144.0 [141.9, 147.7] | 225 [221, 229] |" in out.stdout
    assert "ratio gateway / direct 1.00 [0.71, 1.41]" in out.stdout


H100_PROBES = ROOT / "results/gpu-3/run-2/knee"


def test_h100_probes_show_a_p99_undecidable_on_320_requests_and_the_knee_profile_decides_them():
    # On an H100 (8B shape, bf16), 320 requests at 32 req/s had TTFT p99 64 ms against a 300 ms
    # SLO and all were good, yet both stayed undecided (autocorrelated requests: no upper bound
    # for the p99, goodput >= [0.961]) and the knee search went down. The knee profile's p95 and
    # 95 % decide the same requests.
    from pipelines.gpu import probes
    from workbench.config import SLOConfig

    p99 = SLOConfig(ttft_ms=300, e2el_ms=None, tpot_ms=None, ttft_percentile=99, min_goodput=0.99)
    rows = probes.rows(H100_PROBES, p99)
    assert len(rows) == 6 and all(r["slo"] == "undecided" for r in rows)
    assert all(r["ttft_p"].hi is None and r["ttft_p"].value < 100 for r in rows)
    knee = yaml.safe_load((GPU / "params-gpu3.yaml").read_text())["speed"]["knee"]
    slo = SLOConfig(ttft_ms=300, e2el_ms=None, tpot_ms=None, **{k: knee["slo"][k] for k in ("ttft_percentile", "min_goodput")})
    assert all(r["slo"] == "pass" for r in probes.rows(H100_PROBES, slo))
    assert knee["steady_state"]["min_requests"] * (1 - slo.ttft_percentile / 100) >= 16
    assert "| 32 | llama-3.1-8b-bf16@gateway | 320 |" in probes.markdown(probes.rows(H100_PROBES, slo), slo)


def test_every_gpu_profile_asks_for_enough_requests_to_bound_its_ttft_percentile(tmp_path):
    for profile in (GPU / "params-gpu.yaml", SERVING):
        cfg = merged_params(profile, tmp_path).loadtest
        n = max(cfg.steady_state.min_requests, cfg.requests_per_step or 0)
        assert n * (1 - cfg.slo.ttft_percentile / 100) >= 16, profile.name


def test_the_knee_profile_over_the_8b_profile_searches_bf16_alone_with_the_whole_gpu(tmp_path):
    """params-gpu3-knee.yaml over params-gpu3.yaml: one arm (bf16), no concurrency sweep, no fixed
    KV budget, and the knee search keeps params-gpu3.yaml's p95 SLO on 640 requests a probe, as the
    load test the speed stage builds from it."""
    from workbench import speed_arms
    from workbench.config import LoadtestConfig

    merged_params(GPU / "params-gpu3.yaml", tmp_path)
    assert overlay.main([str(GPU / "params-gpu3-knee.yaml"), "--params", str(tmp_path / "params.yaml")]) == 0
    cfg = load_params(tmp_path / "params.yaml").speed
    cfg = cfg.model_copy(update={"out_dir": str(tmp_path / "speed")})  # the arms' folders are built there
    arms = speed_arms.arms(cfg)
    assert list(arms) == ["llama-3.1-8b-bf16"] and cfg.concurrencies == []
    knee = LoadtestConfig.model_validate(deep_merge(
        speed_arms.run_config(cfg, arms, "knee", mode="knee", gateway_arms=list(arms)).model_dump(), cfg.knee))
    assert knee.server.extra_args == [] and knee.server.gpu_memory_utilization == 0.9
    assert (knee.slo.ttft_percentile, knee.slo.min_goodput, knee.steady_state.min_requests) == (95, 0.95, 640)
    assert knee.knee.start_req_per_s == 64 and knee.max_duration_s <= 420  # ~7 of the lease's 30 minutes
    # an 8B batch's in-flight count levels ~10 s into a probe (run 3a): the warm-up is 8 s, not ~1
    assert knee.steady_state.min_warmup_s == 8


def test_the_quantized_knee_profile_searches_fp8_and_both_4_bit_arms_without_the_gateway(tmp_path):
    """params-gpu3-knee-quant.yaml over params-gpu3.yaml: three searches, interleaved, each arm with
    a fixed 12 GiB KV budget, bf16's SLO, warm-up and probe size, no gateway arm."""
    from workbench import speed_arms
    from workbench.config import LoadtestConfig

    merged_params(GPU / "params-gpu3.yaml", tmp_path)
    assert overlay.main([str(GPU / "params-gpu3-knee-quant.yaml"), "--params", str(tmp_path / "params.yaml")]) == 0
    cfg = load_params(tmp_path / "params.yaml").speed
    cfg = cfg.model_copy(update={"out_dir": str(tmp_path / "speed")})
    arms = speed_arms.arms(cfg)
    searched = speed_arms.knee_arms(cfg, list(arms))
    assert searched == ["llama-3.1-8b-fp8", "llama-3.1-8b-awq-int4", "llama-3.1-8b-gptq-int4"] == list(arms)
    knee = LoadtestConfig.model_validate(deep_merge(
        speed_arms.run_config(cfg, arms, "knee", mode="knee", gateway_arms=searched[:1]).model_dump(), cfg.knee))
    assert knee.gateway_arms == [] and knee.server.extra_args == ["--kv-cache-memory-bytes", str(12 * 2**30)]
    assert (knee.slo.ttft_percentile, knee.slo.min_goodput, knee.steady_state.min_requests) == (95, 0.95, 640)
    assert knee.steady_state.min_warmup_s == 8 and knee.max_duration_s <= 540
