"""The report stage: tables, recommendation, HTML, dvc metrics, and the MLflow UI in a browser.

Stage reports of two variants are written by hand here (the seam); everything downstream of them
is the real code: the report stage through papermill, nbconvert, MLflow server, headless Chromium.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path


import httpx
import numpy as np
import pytest

from workbench import evaluate, loadtest, report as report_stage, report_arms
from workbench.config import LoadtestConfig, ReportConfig, WorkloadConfig
from workbench.net import free_port, stop, wait_http_ok
from workbench.quantize.details import QuantizeDetails
from workbench.reports import Report, read_report, write_report
from workbench.testing.fakeserver import FakeServer, fake_endpoints

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(3)
WORDS = RNG.integers(60, 140, size=25).astype(float)
BASE_LL = -WORDS * RNG.normal(3.0, 0.3, size=25)
# variant -> (size MB, perplexity scale vs base, correct MMLU questions of 30, fake TTFT ms, fail every)
VARIANTS = {
    "base": (270, 1.00, 12, 30, 0),
    "awq-int4": (117, 1.05, 11, 20, 0),  # ~+17 % perplexity, one question fewer
    "gptq-int4": (117, 1.10, 12, 20, 0),  # ~+35 % perplexity, as many questions as base
}


def write_eval(variant: str, scale: float, correct: int, noise_seed: int) -> None:
    samples = Path("runs/evaluate") / variant
    jitter = np.random.default_rng(noise_seed).normal(0, 0.01, size=25)
    mcq = [{"doc_id": i, "acc": float(i < correct)} for i in range(30)]
    docs = [{"doc_id": i, "word_perplexity": [float(BASE_LL[i] * (scale + jitter[i])), float(WORDS[i])]}
            for i in range(25)]
    evaluate.results._save_samples({"samples": {"wb_mmlu_astronomy": mcq}}, samples / "mmlu.jsonl")
    evaluate.results._save_samples({"samples": {"wb_perplexity": docs}}, samples / "perplexity.jsonl")
    ll, w = zip(*(d["word_perplexity"] for d in docs))
    write_report(Report(stage="evaluate", variant=variant, config={}, outputs={"samples": str(samples)},
                        metrics={"mmlu_acc": correct / 30, "ppl_word": float(np.exp(-sum(ll) / sum(w)))}))


def write_loadtests(monkeypatch, variants: dict, gateway_arms=()) -> None:
    """The real load-test stage, interleaved, against one fake server per variant."""
    fakes = {v: FakeServer(ttft_ms=x[3], itl_ms=2, output_tokens=4, model="fake", fail_every=x[4])
             for v, x in variants.items()}
    fake_endpoints(monkeypatch, fakes)
    loadtest.run(LoadtestConfig(model="fake", variants=list(variants), rates=[20, 40], requests_per_step=10,
                                window="schedule", warmup_requests=1, repeats=2, scrape_metrics=False,
                                workload=WorkloadConfig(kind="synthetic", path=None, input_tokens=8, output_tokens=4, max_tokens=4),
                                gateway_arms=list(gateway_arms), gateway_config=str(ROOT / "deploy/gateway.yaml")))


def quantize_details(mb: float, broken: bool) -> dict:
    """What the quantize stage writes of a GPTQ variant (its details are typed: the report reads them)."""
    return QuantizeDetails.checked({
        "method": "gptq", "format": "compressed-tensors", "bits": 4, "group_size": 64, "symmetric": True,
        "vllm_cpu_servable": True, "content": {"sha256": "0" * 64, "files": 1, "bytes": int(mb * 1e6)},
        "check": {"how": "not checked: a test's report", "tokens": 0, "window": 256, "perplexity": 20.0,
                  "perplexity_base": 18.0, "perplexity_ratio": 20.0 / 18.0, "broken": broken}})


def write_stage_reports(monkeypatch, variants=VARIANTS, broken=(), gateway_arms=()):
    write_report(Report(stage="prepare", variant="base", config={}, metrics={"model_bytes": 270e6}))
    for i, (v, (mb, scale, correct, _, _)) in enumerate(variants.items()):
        write_eval(v, scale, correct, i)
        if v != "base":
            write_report(Report(stage="quantize", variant=v, config={}, details=quantize_details(mb, v in broken),
                                metrics={"model_bytes": mb * 1e6, "broken": float(v in broken)}))
    write_loadtests(monkeypatch, variants, gateway_arms)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


CFG = ReportConfig(variants=list(VARIANTS), target_rate_req_per_s=20.0)


def dumped(report) -> dict:
    """The report's details as all.json holds them (the JSON others read)."""
    return report.model_dump(mode="json")["details"]


def test_quality_first_recommends_base_when_every_variant_is_significantly_worse(in_tmp, monkeypatch):
    write_stage_reports(monkeypatch)
    r = report_stage.run(CFG)
    rec = dumped(r)["recommendation"]
    assert rec["variant"] == "base"
    ppl = rec["steps"][0]
    assert ppl["criterion"] == "perplexity" and set(ppl["dropped"]) == {"awq-int4", "gptq-int4"}
    assert "perplexity +" in rec["reason"] and "n = 25 documents" in rec["reason"]
    q = {row["variant"]: row for row in dumped(r)["quantization_table"]}
    assert math.isclose(q["gptq-int4"]["compression"], 270 / 117)
    change = q["gptq-int4"]["ppl_change_vs_base"]
    assert change["significant"] and 30 < change["diff"]["lo"] < change["diff"]["value"] < change["diff"]["hi"] < 40
    assert q["gptq-int4"]["mmlu_vs_base"]["p_value"] == 1.0  # same count of right answers
    for v in VARIANTS:
        m = {k.split(".", 1)[1]: x for k, x in r.metrics.items() if k.startswith(f"{v}.")}
        assert m["mmlu_acc_ci_lo"] < m["mmlu_acc"] < m["mmlu_acc_ci_hi"]
        assert m["ppl_word_ci_lo"] < m["ppl_word"] < m["ppl_word_ci_hi"]
        assert m["goodput_at_target_ci_lo"] <= m["goodput_at_target"] <= m["goodput_at_target_ci_hi"]
        assert "ttft_ms_p99_at_target_ci_hi" not in m  # 20 requests cannot bound a p99 from above
    metrics = json.loads(Path("metrics.json").read_text())  # the recommended variant's, for dvc metrics show
    base = r.metrics
    assert metrics == {"recommended": "base", "mb": 270.0,
                       "acc": round(base["base.mmlu_acc"], 4), "acc_lo": pytest.approx(base["base.mmlu_acc_ci_lo"], rel=1e-3),
                       "acc_hi": pytest.approx(base["base.mmlu_acc_ci_hi"], rel=1e-3),
                       "ttft_p99": pytest.approx(base["base.ttft_ms_p99_at_target"], rel=1e-3),
                       "ttft_p99_lo": pytest.approx(base["base.ttft_ms_p99_at_target_ci_lo"], rel=1e-3),
                       "slo": base["base.slo_at_target"], "drift": 0.0}
    quant, load, _ = report_stage.tables(r)
    assert quant["perplexity vs base"].str.contains(r"\[").sum() == 2 and load["TTFT p50 ms"].str.contains(r"\[").all()
    for name in ("accuracy_vs_size.png", "latency_vs_rate.png", "ttft_cdf.png"):
        assert (in_tmp / "reports/report" / name).stat().st_size > 0


def test_the_tables_compare_with_the_configured_baseline_not_base(in_tmp, monkeypatch):
    """evaluate.baseline (report.baseline) decides what "vs" means; base is an ordinary row then."""
    write_stage_reports(monkeypatch)
    r = report_stage.run(CFG.model_copy(update={"baseline": "awq-int4"}))
    rows = {row.variant: row for row in r.details.quantization_table}  # typed: QuantRow
    assert r.details.baseline == "awq-int4" and rows["awq-int4"].ppl_change_vs_base is None
    assert rows["base"].ppl_change_vs_base.diff.hi < 0  # base has the lower perplexity of the two
    assert rows["gptq-int4"].ppl_change_vs_base.diff.lo > 0 and rows["base"].mmlu_vs_base is not None
    assert rows["base"].method == "reference" and rows["base"].bytes == 270e6  # still prepare's folder
    quant, _, decision = report_stage.tables(read_report(r.path))  # as read back from disk
    assert "perplexity vs awq-int4" in quant.columns and "perplexity vs base" not in quant.columns
    assert decision.variant == "base"  # a typed recommend.Decision; the baseline does not decide
    assert quant.set_index("variant").loc["base", "perplexity vs awq-int4"].startswith("-")


def test_the_recommendation_states_its_error_rate_and_the_power_it_had(in_tmp, monkeypatch):
    write_stage_reports(monkeypatch)
    rec = dumped(report_stage.run(CFG))["recommendation"]
    assert "Holm" in rec["correction"] and "Bonferroni" in rec["correction"]
    error, ppl, acc = rec["power"]
    assert error.startswith("Error rate") and "at most 5%" in error
    assert "On these 25 documents from 25 pages, a 2 % perplexity change with probability" in ppl
    assert acc.startswith("A 5-point mmlu_acc difference would be detected with probability 0.")
    assert "on these 30 questions; on the full MMLU test set (14,042), 1.00" in acc


def test_within_a_memory_budget_perplexity_decides_and_one_question_is_a_tie(in_tmp, monkeypatch):
    write_stage_reports(monkeypatch)
    r = report_stage.run(CFG.model_copy(update={"memory_budget_bytes": 200e6}))
    rec = dumped(r)["recommendation"]
    assert rec["variant"] == "awq-int4" and "exceeds the 200 MB budget" in rec["rejected"]["base"]
    assert "gptq-int4" in rec["steps"][0]["dropped"]  # +15 % perplexity vs awq, outside the noise
    metrics = json.loads(Path("metrics.json").read_text())
    assert metrics["recommended"] == "awq-int4" and metrics["mb"] == r.metrics["awq-int4.mb"]
    assert metrics["ppl_pct_lo"] < metrics["ppl_pct"] < metrics["ppl_pct_hi"]  # its change against base


def test_a_one_question_difference_in_thirty_does_not_decide(in_tmp, monkeypatch):
    # same perplexity; gptq answers one more question, but is 10 % larger: size decides
    variants = {"base": (270, 1.0, 12, 30, 0), "awq-int4": (110, 1.08, 11, 20, 0), "gptq-int4": (121, 1.08, 12, 20, 0)}
    write_stage_reports(monkeypatch, variants)
    r = report_stage.run(CFG.model_copy(update={"memory_budget_bytes": 200e6}))
    rec = dumped(r)["recommendation"]
    assert rec["variant"] == "awq-int4"
    acc = next(s for s in rec["steps"] if s["criterion"] == "mmlu accuracy")
    assert acc["dropped"] == {} and "Holm-adjusted" in acc["ties"]["awq-int4"]
    assert "size: gptq-int4 dropped" in rec["reason"]


def test_a_variant_shown_to_fail_the_slo_or_broken_is_never_recommended(in_tmp, monkeypatch):
    variants = {**VARIANTS, "base": (270, 1.0, 12, 30, 2)}  # every 2nd request of base fails
    write_stage_reports(monkeypatch, variants, broken=("awq-int4",))
    r = report_stage.run(CFG)
    rec = dumped(r)["recommendation"]
    assert rec["variant"] == "gptq-int4"
    assert "fail the SLO" in rec["rejected"]["base"] and "broken" in rec["rejected"]["awq-int4"]
    q = {row["variant"]: row for row in dumped(r)["quantization_table"]}
    assert q["awq-int4"]["broken"] and not q["gptq-int4"]["broken"]


def test_a_gateway_arm_in_the_load_test_is_shown_and_never_a_candidate(in_tmp, monkeypatch):
    for rel in ("data/gateway/sensitive_words.en.txt", "data/gateway/sensitive_words.zh.txt"):
        (in_tmp / rel).parent.mkdir(parents=True, exist_ok=True)  # deploy/gateway.yaml names them relatively
        shutil.copy(ROOT / rel, in_tmp / rel)
    write_stage_reports(monkeypatch, gateway_arms=("awq-int4",))
    assert (in_tmp / "reports/loadtest/awq-int4@gateway.json").exists()
    r = report_stage.run(CFG)
    assert dumped(r)["recommendation"]["variant"] == "base"  # as without the gateway arm
    assert [row["variant"] for row in dumped(r)["quantization_table"]] == list(VARIANTS)
    assert {row["variant"] for row in dumped(r)["load_table"]} == set(VARIANTS)
    assert not any("@" in k for k in r.metrics) and "awq-int4@gateway" not in dumped(r)["missing"]
    gw = dumped(r)["gateway"]["awq-int4@gateway"]  # shown beside the tables, from loadtest's all.json
    assert gw["variant"] == "awq-int4" and [x["offered_req_per_s"] for x in gw["per_rate"]] == [20, 40]
    assert report_stage.tables(r)[1]["variant"].isin(list(VARIANTS)).all()


@pytest.mark.integration
def test_report_notebook_html_has_both_tables_and_plots_and_mlflow_ui_shows_variants(project, monkeypatch):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        write_stage_reports(monkeypatch, {v: VARIANTS[v] for v in ("base", "gptq-int4")})
    finally:
        os.chdir(cwd)
    (project / "params.yaml").write_text("report:\n  variants: [base, gptq-int4]\n  target_rate_req_per_s: 20\n")
    out = subprocess.run([sys.executable, "-m", "pipelines.run_stage", "report"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    html = (project / "reports/report/report.html").read_text()
    assert "quantization-table" in html and "load-table" in html
    assert html.count("data:image/png;base64") >= 3  # accuracy vs size, latency vs rate, TTFT CDF
    assert "Recommendation" in html and "gptq-int4" in html and "95 % intervals" in html
    metrics = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "metrics.json"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=120)
    recommended = json.loads((project / "reports/report/all.json").read_text())["details"]["recommendation"]["variant"]
    assert recommended in metrics.stdout and "acc_lo" in metrics.stdout, metrics.stdout + metrics.stderr
    assert max(map(len, metrics.stdout.splitlines())) <= 130, metrics.stdout  # one screen wide
    browse_mlflow_ui(project, env)


def browse_mlflow_ui(project: Path, env: dict) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (.ci/run installs it with apt-get)"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "ui", "--port", str(port)], cwd=project, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_http_ok(f"{url}/health", 180, server), "workbench ui did not answer /health"
        exp = httpx.get(f"{url}/api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": "llm-workbench"}).json()["experiment"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{url}/#/experiments/{exp['experiment_id']}/runs", wait_until="domcontentloaded")
            page.get_by_text("variant:gptq-int4").first.wait_for(timeout=60_000)
            # Variants share metric keys, so a metric filter in the UI lines them up.
            search = page.get_by_placeholder("metrics.rmse", exact=False).first
            search.fill("metrics.mmlu_acc > 0 and metrics.ttft_ms_p99_at_target > 0")
            search.press("Enter")
            page.wait_for_timeout(3000)
            page.get_by_text("variant:base").first.wait_for(timeout=30_000)
            body = page.inner_text("body")
            page.screenshot(path=str(project / "mlflow-ui.png"))
            browser.close()
        runs = httpx.post(f"{url}/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [exp["experiment_id"]],
            "filter": "tags.`workbench.role` = 'variant'"}).json()["runs"]
        assert sorted(r["info"]["run_name"] for r in runs) == ["variant:base", "variant:gptq-int4"]
        for run in runs:
            keys = {m["key"] for m in run["data"].get("metrics", [])}
            assert {"mmlu_acc", "mmlu_acc_ci_lo", "ttft_ms_p99_at_target"} <= keys, keys
        assert "variant:base" in body and "variant:gptq-int4" in body
        assert "2 matching runs" in body  # only the two variants carry both metrics
    finally:
        stop(server, 30)


def test_report_prices_each_arm_and_cost_breaks_the_tie_the_tests_left(in_tmp, monkeypatch):
    # two variants alike in every measured way; report.prices makes gptq-int4 half the price
    variants = {"awq-int4": (117, 1.0, 11, 20, 0), "gptq-int4": (117, 1.0, 11, 20, 0)}
    write_stage_reports(monkeypatch, variants)
    cfg = ReportConfig(variants=list(variants), target_rate_req_per_s=20.0, prices={
        "awq-int4": {"per_million_input_tokens": 1.0, "per_million_output_tokens": 4.0},
        "gptq-int4": {"per_million_input_tokens": 0.5, "per_million_output_tokens": 2.0}})
    r = report_stage.run(cfg)
    rec = r.details.recommendation
    assert rec.variant == "gptq-int4", rec.reason  # without prices the order would pick awq-int4
    cost = next(s for s in rec.steps if s.criterion == "cost")
    assert list(cost.dropped) == ["awq-int4"] and "USD per 1e6 output tokens" in rec.reason
    row = {x.variant: x for x in r.details.quantization_table}["gptq-int4"]
    # 4 output tokens a request; prompt tokens as the fake server counts them (words)
    per_m = row.cost_per_million_output_tokens.value
    assert 2.0 < per_m < 2.0 + 0.5 * 20 and r.metrics["gptq-int4.cost_per_million_output_tokens"] == pytest.approx(per_m)


def test_a_knee_searchs_sustained_rate_is_its_bracket():
    """sustained_rate read the knee as a dict and named KneeResult without importing it: every
    arm report with a knee (results/gpu-2) raised NameError. It reads the typed details now."""
    est = report_arms.sustained_rate(read_report(ROOT / "results/gpu-2/loadtest/base.json"))
    assert (est.value, est.lo, est.method) == (200.0, 200.0, "knee search bracket")
    assert est.hi == pytest.approx(282.842712474619)


# ---- the arms side by side: quality, sustained rate, cost (report_arms, plots.quality_rate_cost) ----

def set_verdicts(variant: str, verdicts: dict[float, str]) -> None:
    """The SLO verdict of ``variant``'s load test at each offered rate, set in its report on disk."""
    path = Path(f"reports/loadtest/{variant}.json")
    data = json.loads(path.read_text())
    for r in data["details"]["rates"]:
        r["slo"]["overall"] = verdicts.get(r["offered_req_per_s"], r["slo"]["overall"])
    path.write_text(json.dumps(data))


def arm(variant, quality=None, rate=None, cost=None, engine="vllm"):
    from workbench.report_details import ArmPoint
    from workbench.stats import Estimate

    est = lambda v: None if v is None else Estimate(value=v[0], lo=v[1], hi=v[2])  # noqa: E731
    return ArmPoint(variant=variant, engine=engine, quality_metric="mmlu_acc", quality=est(quality),
                    sustained_req_per_s=est(rate), cost_per_million_output_tokens=est(cost),
                    cost_currency="USD" if cost else None)


def test_the_picture_has_one_point_per_arm_and_marks_an_arm_without_quality_or_cost(tmp_path):
    from workbench import plots

    nan = float("nan")
    points = [arm("base", (0.4, 0.25, 0.6), (2, 2, 4), (0.2, 0.1, 0.2)),
              arm("speed-only", None, (4, 4, None), (0.1, 0.0, 0.1)),  # no quality; rate bounded below only
              arm("unpriced", (0.3, 0.2, 0.5), (1, 1, 2), None, engine="llama.cpp"),
              arm("nan-cost", (0.35, 0.2, 0.5), (1, 1, 2), (nan, nan, nan), engine="url"),
              arm("no-rate", (0.3, 0.2, 0.5), None, None, engine="url"),
              arm("too-slow", (0.3, 0.2, 0.5), (None, None, 1.0), None, engine="llama.cpp")]  # failed at 1
    fig = plots.quality_rate_cost_figure(points, "mmlu_acc")
    rate_ax, cost_ax = fig.axes
    labels = lambda ax: [c.get_label() for c in ax.containers]  # noqa: E731  one errorbar per arm
    assert labels(rate_ax) == ["base (vllm)", "speed-only (vllm): no quality, bounded below only",
                               "unpriced (llama.cpp)", "nan-cost (url)", "too-slow (llama.cpp): no rate passed (< 1 req/s)"]
    assert labels(cost_ax) == ["base (vllm)", "speed-only (vllm): no quality"]
    texts = lambda ax: " ".join(t.get_text() for t in ax.texts)  # noqa: E731
    assert texts(rate_ax) == "no sustained rate: no-rate"
    assert texts(cost_ax) == "no cost: unpriced, nan-cost, no-rate, too-slow"
    slow = rate_ax.containers[4]
    assert list(slow.lines[0].get_xdata()) == [0.0] and rate_ax.get_xlim()[0] < 0  # its bar spans [0, 1)
    assert "no quality" in [t.get_text() for t in rate_ax.get_yticklabels()]
    speed_only = rate_ax.containers[1].lines[0].get_ydata()
    assert list(speed_only) == [plots.NO_QUALITY_Y]  # on the labelled line, not at a made-up accuracy
    path = plots.quality_rate_cost(points, tmp_path / "q.png", "mmlu_acc")
    assert Path(path).stat().st_size > 0
    plots.quality_rate_cost([], tmp_path / "empty.png", "mmlu_acc")  # no arm at all: a figure, no crash


def test_the_report_puts_every_arm_in_the_picture_the_summary_and_mlflow(in_tmp, monkeypatch):
    from mlflow import MlflowClient

    from workbench import tracking
    from workbench.stages import log_to

    write_stage_reports(monkeypatch)
    set_verdicts("base", {20: "pass", 40: "fail"})  # a bracket (the fake's 10-request steps decide nothing)
    cfg = ReportConfig(variants=list(VARIANTS), target_rate_req_per_s=20.0, prices={
        "base": {"per_gpu_hour": 2.0}, "gptq-int4": {"per_million_input_tokens": 0.5, "per_million_output_tokens": 2.0}})
    r = report_stage.run(cfg)
    arms = {p.variant: p for p in r.details.arms}
    assert list(arms) == list(VARIANTS)
    base = arms["base"]
    assert base.quality.lo < base.quality.value < base.quality.hi
    assert (base.sustained_req_per_s.lo, base.sustained_req_per_s.hi) == (20, 40)
    assert base.ceiling.startswith("SLO met up to 20 req/s, shown to fail at 40; at 40 req/s limited by ")
    cost = base.cost_per_million_output_tokens  # 2 USD/h over [20, 40) req/s: both ends bounded
    assert cost.lo == pytest.approx(2 / (40 * 4 * 3600) * 1e6) and cost.value == cost.hi == pytest.approx(2 / (20 * 4 * 3600) * 1e6)
    assert arms["gptq-int4"].sustained_req_per_s.value is None  # undecided steps: no rate shown
    assert arms["gptq-int4"].cost_per_million_output_tokens.value is not None  # per token: any rate
    assert arms["awq-int4"].cost_per_million_output_tokens is None and arms["awq-int4"].cost_note == "no price in report.prices"
    rows = json.loads(Path("reports/report/plots/quality_rate_cost.json").read_text())
    assert [row["variant"] for row in rows] == list(VARIANTS) and rows[1]["cost_per_million_output_tokens"] is None
    summary = Path("reports/report/summary.md").read_text()
    assert summary.count("\n| ") >= 3 + 6 and "![quality vs sustained rate and cost](quality_rate_cost.png)" in summary
    assert "no price in report.prices" in summary and f"**{r.details.recommendation.variant}**" in summary
    assert Path(r.outputs["quality_rate_cost"]).stat().st_size > 0
    with tracking.stage_run("report", "all", system_metrics=False) as run:
        log_to(run, r)
    client = MlflowClient(tracking.tracking_uri())
    logged = {a.path for a in client.list_artifacts(run.run_id, "plots")}
    assert {"plots/quality_rate_cost.png", "plots/quality_rate_cost.json"} <= logged
    assert "summary.md" in {a.path for a in client.list_artifacts(run.run_id)}


def test_a_sweep_brackets_the_sustained_rate_and_a_knee_report_is_read(in_tmp, monkeypatch):
    """The sustained rate is [highest passed, lowest failed above it); knee mode's bracket comes
    from the typed knee (report.py read it through a name it never imported: knee reports with a
    price raised NameError)."""
    from workbench.report_arms import sustained_rate

    write_loadtests(monkeypatch, {"base": VARIANTS["base"]})
    set_verdicts("base", {20: "pass", 40: "pass"})
    lt = read_report("reports/loadtest/base.json")
    assert sustained_rate(lt).value == 40 and sustained_rate(lt).hi is None  # none failed: bounded below
    rates = lt.details["rates"]
    rates[1]["slo"]["overall"] = "fail"  # 40 req/s shown to fail
    est = sustained_rate(lt)
    assert (est.value, est.lo, est.hi) == (20, 20, 40)
    rates[0]["slo"]["overall"] = "fail"
    assert sustained_rate(lt).value is None and sustained_rate(lt).hi == 20  # nothing passed: no rate
    lt.details["knee"] = {"sustained_req_per_s": 3.0, "lo": 3.0, "hi": 3.5, "converged": True,
                          "hi_undecided": False, "tolerance": 0.1, "probes": [], "note": "converged"}
    est = sustained_rate(lt)
    assert (est.value, est.lo, est.hi, est.method) == (3.0, 3.0, 3.5, "knee search bracket")
