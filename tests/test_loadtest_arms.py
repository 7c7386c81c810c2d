"""loadtest.arms: URL and llama.cpp arms beside the variants, in the same counterbalanced blocks, on
the same requests, paired with the control; a URL arm's key never written anywhere."""

import json
import logging
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from workbench import loadtest
from workbench.config import KneeConfig, LoadtestConfig, WorkloadConfig
from workbench.loadtest.plan import Outcome, make_plan
from workbench.reports import read_report
from workbench.stats import Verdict
from workbench.testing.fakeserver import FakeServer, fake_endpoints

KEY = "sk-test-9f3c1d-never-written"  # what a hosted API's key looks like to a grep
SHORT = dict(window="schedule", rates=[10], requests_per_step=6, warmup_requests=1, repeats=2,
             scrape_metrics=False, order="fixed")


def url_arm(fake, **extra) -> dict:
    return {"kind": "url", "name": "hosted", "base_url": fake.base_url, "model": "hosted-model",
            "api_key_env": "WB_TEST_HOSTED_KEY", **extra}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_url_arm_runs_in_the_controls_blocks_on_the_same_requests_and_is_paired(in_tmp, monkeypatch, caplog):
    monkeypatch.setenv("WB_TEST_HOSTED_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    fake_endpoints(monkeypatch, {"base": FakeServer(ttft_ms=10, itl_ms=1, output_tokens=4, model="fake")})
    # the hosted stand-in asks for the key and frames its SSE with CRLF, as sse-starlette does
    hosted = FakeServer(ttft_ms=60, itl_ms=1, output_tokens=4, model="hosted-model", api_key=KEY,
                        line_ending="crlf")
    with hosted:
        cfg = LoadtestConfig(model="fake", variants=["base"], arms=[url_arm(hosted)], **SHORT)
        report = loadtest.run(cfg)
    order = [(o["variant"], o["label"], o["block"]) for o in report.details["order"]]
    assert order == [("base", "rate_10", 0), ("hosted", "rate_10", 0),
                     ("base", "rate_10-r1", 1), ("hosted", "rate_10-r1", 1)]
    base, arm = (read_report(in_tmp / f"reports/loadtest/{v}.json") for v in ("base", "hosted"))
    sched = [[json.loads(line)["scheduled_s"] for line in Path(r.outputs["records_rate_10"]).read_text().splitlines()]
             for r in (base, arm)]
    assert sched[0] == sched[1]  # the same arrivals for both arms
    recs = [json.loads(line) for line in Path(arm.outputs["records_rate_10"]).read_text().splitlines()]
    assert all(r["success"] for r in recs)  # the key was sent (401 otherwise) and CRLF was read
    assert arm.details["server"]["api_key_env"] == "WB_TEST_HOSTED_KEY" and arm.details["server"]["engine"] == "url"
    paired = report.details["paired"]["arms"]["hosted"]["rate_10"]
    assert paired["blocks"] == [0, 1] and paired["ttft_over_control"]["value"] > 2  # 60 ms against 10 ms
    leaks = [str(p) for p in files_under(in_tmp) if KEY.encode() in p.read_bytes()]
    assert leaks == [] and KEY not in caplog.text


def test_unset_key_variable_is_named_before_anything_starts(in_tmp, monkeypatch):
    monkeypatch.delenv("WB_TEST_HOSTED_KEY", raising=False)
    started = fake_endpoints(monkeypatch, {"base": FakeServer(model="fake")})
    cfg = LoadtestConfig(model="fake", variants=["base"],
                         arms=[{"kind": "url", "name": "hosted", "base_url": "http://127.0.0.1:9/v1",
                                "model": "m", "api_key_env": "WB_TEST_HOSTED_KEY"}], **SHORT)
    with pytest.raises(ValueError, match="WB_TEST_HOSTED_KEY"):
        loadtest.run(cfg)
    assert started == []


def test_rate_cap_keeps_a_url_arm_out_of_faster_blocks(in_tmp, monkeypatch):
    monkeypatch.setenv("WB_TEST_HOSTED_KEY", KEY)
    fake_endpoints(monkeypatch, {"base": FakeServer(ttft_ms=5, itl_ms=1, output_tokens=2, model="fake")})
    with FakeServer(ttft_ms=5, itl_ms=1, output_tokens=2, model="hosted-model", api_key=KEY) as hosted:
        cfg = LoadtestConfig(model="fake", variants=["base"], arms=[url_arm(hosted, max_rate_req_per_s=10)],
                             **{**SHORT, "rates": [10, 20], "repeats": 1})
        report = loadtest.run(cfg)
    order = [(o["variant"], o["label"]) for o in report.details["order"]]
    assert order == [("base", "rate_10"), ("hosted", "rate_10"), ("base", "rate_20")]
    assert report.details["rate_caps"] == {"hosted": 10}


def test_a_single_named_arm_runs_alone(in_tmp, monkeypatch):
    monkeypatch.setenv("WB_TEST_HOSTED_KEY", KEY)
    started = fake_endpoints(monkeypatch, {"base": FakeServer(model="fake")})
    with FakeServer(output_tokens=2, model="hosted-model", api_key=KEY) as hosted:
        cfg = LoadtestConfig(model="fake", variants=["base"], arms=[url_arm(hosted)], **{**SHORT, "repeats": 1})
        report = loadtest.run(cfg, variant="hosted")
    recs = [json.loads(line) for line in Path(report.outputs["records_rate_10"]).read_text().splitlines()]
    assert report.variant == "hosted" and recs and all(r["success"] for r in recs)
    assert started == ["hosted"]  # the variants' servers were never started


def test_knee_search_of_a_capped_arm_ends_at_its_cap_with_the_reason():
    cfg = LoadtestConfig(mode="knee", variants=["a"], knee=KneeConfig(start_req_per_s=1.0),
                         arms=[{"kind": "url", "name": "h", "base_url": "http://x/v1", "model": "m",
                                "max_rate_req_per_s": 1.5}])
    plan = make_plan(cfg, ["a", "h"])
    block = plan.next_block()
    assert [s.arm for s in block] == ["a", "h"] or sorted(s.arm for s in block) == ["a", "h"]
    for spec in block:
        plan.observe(spec, Outcome(verdict=Verdict.passed, steady=True))
    nxt = plan.next_block()
    assert [s.arm for s in nxt] == ["a"] and nxt[0].point.rate > 1.5
    result = plan.knees()["h"]
    assert result.lo == 1.0 and "max_rate_req_per_s 1.5" in result.note


@pytest.mark.parametrize("arms,key", [
    ([{"kind": "url", "name": "h", "base_url": "http://x/v1", "model": "m", "api_kye_env": "K"}], "api_kye_env"),
    ([{"kind": "ftp", "name": "h"}], "kind"),
    ([{"kind": "url", "name": "h", "base_url": "x.example/v1", "model": "m"}], "base_url"),
    ([{"kind": "llamacpp", "name": "g"}, {"kind": "llamacpp", "name": "g"}], "more than once"),
    ([{"kind": "llamacpp", "name": "a/b"}], "name"),
])
def test_a_bad_arm_is_refused_naming_the_key(arms, key):
    with pytest.raises(ValidationError, match=key):
        LoadtestConfig(arms=arms)


def test_an_arm_named_like_a_variant_is_refused(in_tmp):
    cfg = LoadtestConfig(variants=["base"], arms=[{"kind": "llamacpp", "name": "base"}])
    with pytest.raises(ValueError, match="already the name of a variant"):
        loadtest.run(cfg)


def test_vllm_arm_serves_its_variants_folder_under_its_own_name():
    from workbench.loadtest.arms import server_config

    cfg = LoadtestConfig(variants=[], arms=[{"kind": "vllm", "name": "base-tuned", "variant": "base"}],
                         server_overrides={"base-tuned": {"max_num_seqs": 4}})
    server = server_config(cfg, "base-tuned")
    assert server.model_dir == "models/base" and server.max_num_seqs == 4


@pytest.mark.integration
def test_llamacpp_arm_and_url_arm_in_one_run_on_the_same_requests(in_tmp, monkeypatch):
    """A real llama.cpp server on the embedded GGUF beside a URL arm (the fake server standing in
    for a hosted API), one short step each, twice, interleaved."""
    monkeypatch.setenv("WB_TEST_HOSTED_KEY", KEY)
    with FakeServer(ttft_ms=20, itl_ms=2, output_tokens=8, model="hosted-model", api_key=KEY,
                    line_ending="crlf") as hosted:
        cfg = LoadtestConfig(
            variants=[], arms=[{"kind": "llamacpp", "name": "gguf", "server": {"threads": 1}}, url_arm(hosted)],
            workload=WorkloadConfig(kind="synthetic", input_tokens=16, output_tokens=8, max_tokens=8),
            **{**SHORT, "rates": [1.0], "requests_per_step": 3})
        report = loadtest.run(cfg)
    assert [o["variant"] for o in report.details["order"]] == ["gguf", "hosted", "gguf", "hosted"]
    gguf = read_report(in_tmp / "reports/loadtest/gguf.json")
    assert gguf.details["server"]["engine"] == "llama.cpp" and gguf.details["server"]["max_num_seqs"] == 1
    recs = [json.loads(line) for line in Path(gguf.outputs["records_rate_1"]).read_text().splitlines()]
    assert len(recs) == 4 and all(r["success"] and r["completion_tokens"] for r in recs), recs
    assert 0 < gguf.metrics["rate_1.ttft_ms_p50"] < 30_000
    paired = report.details["paired"]["arms"]["hosted"]["rate_1"]
    assert paired["blocks"] == [0, 1] and math.isfinite(paired["ttft_over_control"]["value"])
    assert not [p for p in files_under(in_tmp) if KEY.encode() in p.read_bytes()]
