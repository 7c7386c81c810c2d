"""loadtest.gateway_arms: a variant measured direct and through the gateway on the SAME server,
interleaved like two variants, against the fake server (the gateway is the real one, its own
process)."""

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from workbench import loadtest
from workbench.config import ConfigError, KneeConfig, LoadtestConfig, SLOConfig, SteadyStateConfig, load_params
from workbench.reports import read_report
from workbench.testing.fakeserver import FakeServer, fake_endpoints

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_FILES = ("deploy/gateway.yaml", "data/gateway/sensitive_words.en.txt", "data/gateway/sensitive_words.zh.txt")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A project folder with the workload and the gateway's config (filter and audit on)."""
    for rel in ("data/workloads/smoke.sharegpt.json", *GATEWAY_FILES):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def audited_chats(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("select count(*) from audit where route like '%chat/completions'").fetchone()[0]
    finally:
        db.close()


def test_gateway_arm_shares_its_variants_server_and_alternates_with_the_direct_arm(in_tmp, monkeypatch):
    fakes = {v: FakeServer(ttft_ms=t, itl_ms=1, output_tokens=4, model="fake") for v, t in (("a", 20), ("b", 40))}
    started = fake_endpoints(monkeypatch, fakes)
    cfg = LoadtestConfig(window="schedule", model="fake", variants=["a", "b"], gateway_arms=["a"], rates=[10, 20], requests_per_step=6,
                         warmup_requests=1, repeats=2, scrape_metrics=False, order="fixed")
    report = loadtest.run(cfg)

    assert started == ["a", "b"]  # one server per variant: the gateway arm brings up none of its own
    assert fakes["b"].fake.requests == 4 * 7  # b's server saw b's steps only
    assert fakes["a"].fake.requests == 2 * 4 * 7  # both of a's arms
    order = [(o["variant"], o["label"], o["block"]) for o in report.details["order"]]
    assert order == [("a", "rate_10", 0), ("a@gateway", "rate_10", 0), ("b", "rate_10", 0),
                     ("a", "rate_20", 1), ("a@gateway", "rate_20", 1), ("b", "rate_20", 1),
                     ("a", "rate_10-r1", 2), ("a@gateway", "rate_10-r1", 2), ("b", "rate_10-r1", 2),
                     ("a", "rate_20-r1", 3), ("a@gateway", "rate_20-r1", 3), ("b", "rate_20-r1", 3)]
    assert report.details["variants"] == ["a", "b"] and report.details["arms"] == ["a", "a@gateway", "b"]
    assert set(report.details["reports"]) == {"a", "a@gateway", "b"}

    direct, gw = (read_report(in_tmp / f"reports/loadtest/{n}.json") for n in ("a", "a@gateway"))
    assert gw.variant == "a@gateway" and gw.details["server"]["base_url"] == direct.details["server"]["base_url"]
    gw_url = gw.details["server"]["via_gateway"]
    assert gw_url.endswith("/v1") and gw_url != direct.details["server"]["base_url"]
    assert "via_gateway" not in direct.details["server"] and gw.details["server"]["direct_arm"] == "a"
    sched = [[json.loads(line)["scheduled_s"] for line in Path(r.outputs["records_rate_10"]).read_text().splitlines()]
             for r in (direct, gw)]
    assert sched[0] == sched[1]  # the same requests at the same offsets
    assert Path(gw.outputs["records_rate_10"]).parent == Path("runs/loadtest/a@gateway")
    # every request of the gateway arm (warm-up included) went through the gateway, none of the direct arm's
    assert audited_chats(in_tmp / "runs/loadtest/a@gateway/gateway-audit.sqlite") == 4 * 7
    assert not (in_tmp / "runs/loadtest/a/gateway-audit.sqlite").exists()
    assert all(s["completed"] == 6 and s["failed"] == 0 for s in gw.details["step_metrics"].values())

    cmp = report.details["gateway"]["a@gateway"]
    assert cmp["variant"] == "a" and cmp["gateway_url"] == gw_url and cmp["sustained_ratio"] is None  # sweep
    assert [r["offered_req_per_s"] for r in cmp["per_rate"]] == [10, 20]
    for r in cmp["per_rate"]:
        ttft = r["ttft_gateway_over_direct"]  # paired within the two blocks both arms ran in
        assert r["blocks"] == ([0, 2] if r["offered_req_per_s"] == 10 else [1, 3])
        assert ttft["method"].startswith("t over blocks") and ttft["n"] == 2 and ttft["value"] > 0
        assert r["slo_direct"] in ("pass", "fail", "undecided") and r["slo_gateway"] in ("pass", "fail", "undecided")
    assert report.details["drift"]["control"] == "a"
    assert not any("gateway" in k for k in report.metrics)  # no knee: no ratio of sustained rates
    assert len(loadtest.table(report)) == 3 * 2  # every arm's rates in the notebook's table


def test_knee_of_a_variant_direct_and_through_the_gateway_and_their_ratio(in_tmp):
    # one request at a time, 10 ms each: ~100 req/s of capacity for both arms
    with FakeServer(ttft_ms=10, itl_ms=0, output_tokens=1, model="fake", max_running=1) as fake:
        cfg = LoadtestConfig(window="schedule", base_url=fake.base_url, model="fake", mode="knee", requests_per_step=20,
                             warmup_requests=0, arrival="constant", scrape_metrics=False, gateway_arms=["v"],
                             slo=SLOConfig(ttft_ms=60, e2el_ms=None, ttft_percentile=50, min_goodput=0.5),
                             knee=KneeConfig(start_req_per_s=10, tolerance=0.3, max_probes=6),
                             steady_state=SteadyStateConfig(min_requests=8))  # 20-request probes
        report = loadtest.run(cfg, variant="v")  # one variant: its report back, all.json beside it
    assert report.variant == "v"
    gw = read_report(in_tmp / "reports/loadtest/v@gateway.json")
    compared = read_report(in_tmp / "reports/loadtest/all.json")
    variants = [o["variant"] for o in compared.details["order"]]
    assert sorted(variants[:2]) == sorted(variants[2:4]) == ["v", "v@gateway"]  # the searches advance block by block
    assert [o["block"] for o in compared.details["order"][:4]] == [0, 0, 1, 1]
    assert gw.details["knee"]["probes"][0]["rate"] == 10 and report.details["knee"]["probes"][0]["rate"] == 10
    lo_d, lo_g = report.metrics["sustained_req_per_s"], gw.metrics["sustained_req_per_s"]
    cmp = compared.details["gateway"]["v@gateway"]
    assert cmp["sustained_req_per_s"] == {"direct": lo_d, "gateway": lo_g}
    ratio = cmp["sustained_ratio"]
    assert ratio["value"] == pytest.approx(lo_g / lo_d) == compared.metrics["v.gateway_sustained_ratio"]
    if ratio["lo"] is not None:
        assert ratio["lo"] <= ratio["value"] and compared.metrics["v.gateway_sustained_ratio_ci_lo"] == ratio["lo"]
    assert ratio["hi"] is None or ratio["value"] <= ratio["hi"]
    assert {r["offered_req_per_s"] for r in cmp["per_rate"]} >= {10.0}  # the rates both searches probed
    assert audited_chats(in_tmp / "runs/loadtest/v@gateway/gateway-audit.sqlite") == sum(
        s["requests"] for s in gw.details["step_metrics"].values())


def test_a_gateway_arm_of_a_variant_not_compared_is_named_in_the_error(in_tmp, monkeypatch):
    def never(*a, **k):
        raise AssertionError("no server may start")

    monkeypatch.setattr(loadtest.arms, "endpoint", never)
    with pytest.raises(ValueError, match=r"gateway_arms names 'awq-int8'.*\['base', 'awq-int4'\]"):
        loadtest.run(LoadtestConfig(window="schedule", variants=["base", "awq-int4"], gateway_arms=["awq-int4", "awq-int8"]))
    with pytest.raises(ValueError, match="via_gateway"):
        loadtest.run(LoadtestConfig(window="schedule", variants=["base"], gateway_arms=["base"], via_gateway=True))
    with pytest.raises(ConfigError, match=r"gateway_arms \['nope'\]"):
        load_params(ROOT / "params.yaml", ["loadtest.gateway_arms=[nope]"])
    assert load_params(ROOT / "params.yaml", ["loadtest.gateway_arms=[base]"]).loadtest.gateway_arms == ["base"]


def test_gateway_overrides_run_the_gateway_arm_as_workers_sharing_limits_in_redis(in_tmp, monkeypatch, redis_url):
    """A GPU host's gateway: processes beside one another (limits in Redis), from overrides over
    deploy/gateway.yaml, every request answered through them."""
    fake_endpoints(monkeypatch, {"a": FakeServer(ttft_ms=5, itl_ms=1, output_tokens=4, model="fake")})
    over = {"workers": 2, "limits": {"backend": "redis", "redis_url": redis_url, "redis_prefix": "lt-workers:"}}
    cfg = LoadtestConfig(window="schedule", model="fake", variants=["a"], gateway_arms=["a"], rates=[20], requests_per_step=12,
                         warmup_requests=0, repeats=1, scrape_metrics=False,
                         gateway_overrides=over)
    loadtest.run(cfg)
    written = yaml.safe_load((in_tmp / "runs/loadtest/a@gateway/gateway.yaml").read_text())
    assert written["workers"] == 2 and written["limits"]["backend"] == "redis"
    assert written["filter"]["enabled"] and written["moderation"]["policy"] == "keyword"  # the rest kept
    gw = read_report(in_tmp / "reports/loadtest/a@gateway.json")
    assert gw.metrics["rate_20.requests"] == 12 and gw.metrics["rate_20.goodput"] == 1.0
    assert "workers: 2" in (in_tmp / "runs/loadtest/a@gateway/gateway.log").read_text()


def test_a_misspelled_gateway_override_is_named_before_any_step(in_tmp, monkeypatch):
    from workbench.serve import ServerError

    fake_endpoints(monkeypatch, {"a": FakeServer(ttft_ms=5, itl_ms=1, output_tokens=2, model="fake")})
    cfg = LoadtestConfig(window="schedule", model="fake", variants=["a"], gateway_arms=["a"], rates=[20], requests_per_step=2,
                         repeats=1, scrape_metrics=False, gateway_overrides={"worker": 2})
    with pytest.raises(ServerError, match=r"gateway_overrides \{'worker': 2\}.*worker"):
        loadtest.run(cfg)


def test_the_gateway_arm_sends_the_direct_arms_prompts_without_hitting_its_prefix_cache(in_tmp, monkeypatch):
    # Both arms send the same prompts to one server; each salts its prefix cache with its own name
    # (vLLM's cache_salt, relayed by the gateway), so the second arm's prefills are not free.
    fakes = {"a": FakeServer(ttft_ms=5, itl_ms=1, output_tokens=4, model="fake")}
    fake_endpoints(monkeypatch, fakes)
    cfg = LoadtestConfig(window="schedule", model="fake", variants=["a"], gateway_arms=["a"], rates=[20],
                         requests_per_step=6, warmup_requests=1, repeats=1, scrape_metrics=False)
    loadtest.run(cfg)
    fake = fakes["a"].fake
    assert fake.requests == 2 * 7 and fake.prefix_queries > 0
    assert fake.prefix_hits == 0


def test_an_arms_cache_salt_is_one_vllm_accepts_and_an_unsalted_payload_has_none():
    from workbench.loadgen.client import Target, build_payload
    from workbench.loadgen.workloads import RequestSpec
    from workbench.loadtest.arms import cache_salt

    salt = cache_salt("a@gateway")  # vLLM refuses '@' and '/' in a salt: a digest of the name
    assert salt != cache_salt("a") and not set(salt) & set("@/\\\0") and 0 < len(salt) <= 128
    spec = RequestSpec(prompt="hi", max_tokens=2, prompt_tokens_est=1)
    assert "cache_salt" not in json.loads(build_payload(Target("http://x/v1", "m"), spec))
    assert json.loads(build_payload(Target("http://x/v1", "m", cache_salt=salt), spec))["cache_salt"] == salt


def test_table_6_2_lists_every_probe_of_both_arms_beside_its_decode_floor_and_the_gateways_share(in_tmp):
    from workbench import roofline
    from workbench.speed_tables import knee_markdown

    shutil.copytree(ROOT / "data/shapes", in_tmp / "data/shapes")
    arm = "llama-3.1-8b-bf16"  # the speed stage's name for the 8B shape in bf16 (served here by a fake)
    with FakeServer(ttft_ms=10, itl_ms=1, output_tokens=4, model="fake", max_running=1) as fake:
        cfg = LoadtestConfig(window="schedule", base_url=fake.base_url, model="fake", mode="knee", requests_per_step=20,
                             warmup_requests=0, arrival="constant", scrape_metrics=False, gateway_arms=[arm],
                             slo=SLOConfig(ttft_ms=60, e2el_ms=None, ttft_percentile=50, min_goodput=0.5),
                             knee=KneeConfig(start_req_per_s=10, tolerance=0.3, max_probes=4),
                             steady_state=SteadyStateConfig(min_requests=8))
        loadtest.run(cfg, variant=arm)
    compared = read_report(in_tmp / "reports/loadtest/all.json")
    from workbench.config.speed import ShapeConfig

    speed = load_params(ROOT / "params.yaml").speed.model_copy(update={"shapes": {"llama-3.1-8b": ShapeConfig(
        config="data/shapes/llama-3.1-8b.json", tokenizer="llama3")}})
    md = knee_markdown(speed, compared, roofline.gpu("NVIDIA H100 80GB HBM3"))
    rows = [line for line in md.split("probe by probe", 2)[1].splitlines() if line.startswith(f"| {arm}")]
    steps = {a: len(read_report(in_tmp / f"reports/loadtest/{a}.json").details["steps"]) for a in (arm, arm + "@gateway")}
    assert len(rows) == sum(steps.values()) and all(steps.values())
    assert sum(r.startswith(f"| {arm}@gateway |") for r in rows) == steps[arm + "@gateway"]
    from workbench.loadtest.report import read_records
    from workbench.speed_tables import mean_tokens

    gpu = roofline.gpu("NVIDIA H100 80GB HBM3")
    shape = roofline.Shape.from_config(roofline.read_json(in_tmp / "data/shapes/llama-3.1-8b.json"))
    direct = read_report(in_tmp / f"reports/loadtest/{arm}.json")
    first = min(direct.details["steps"], key=lambda st: (st["offered_req_per_s"], st["repeat"]))
    prompt, out = mean_tokens(read_records(first["records_file"]))
    want = roofline.decode_floor_ms(shape, "bf16", gpu, 1.0, prompt + out / 2)  # no scrape: a batch of 1
    for i, r in enumerate(rows):  # each probe: its floor and fraction, its verdicts, what bound it
        cells = [c.strip() for c in r.strip("|").split("|")]
        floor, frac = cells[7].split(" (")
        tpot = float(cells[6].split(" [")[0])
        assert float(frac.rstrip(")")) == pytest.approx(float(floor) / tpot, rel=0.02)  # of 2-decimal cells
        if i == 0:
            assert float(floor) == pytest.approx(want, abs=0.005) and want > 4  # 16 GB over 3.35 TB/s
        assert cells[10] in ("steady", "not sustainable", "too short to tell")
        assert cells[11] in ("pass", "fail", "undecided") and cells[12] != "n/a"
    assert f"- {arm}: sustained" in md and f"- {arm}@gateway: the gateway's knee over the direct knee" in md
    # each probe both arms ran (same label: same block): gateway / direct, bounded by both steps' intervals
    via = read_report(in_tmp / f"reports/loadtest/{arm}@gateway.json").details["steps"]
    direct_by_label = {st["label"]: st for st in direct.details["steps"]}
    ratio_rows = [line for line in md.split("probe by probe", 2)[2].splitlines() if line.startswith(f"| {arm}@gateway")]
    assert len(ratio_rows) == sum(st["label"] in direct_by_label for st in via) > 0
    for st, r in zip(sorted(via, key=lambda x: (x["offered_req_per_s"], x["repeat"])), ratio_rows):
        ttft = [c.strip() for c in r.strip("|").split("|")][2]
        value, lo, hi = (float(x) for x in ttft.replace("[", "").replace("]", "").replace(",", "").split())
        g, d = st["latency"]["ttft"]["p"]["p50"], direct_by_label[st["label"]]["latency"]["ttft"]["p"]["p50"]
        assert value == pytest.approx(g["value"] / d["value"], abs=0.006)
        assert lo == pytest.approx(g["lo"] / d["hi"], abs=0.006) and hi == pytest.approx(g["hi"] / d["lo"], abs=0.006)
