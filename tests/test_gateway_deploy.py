"""The team deployment files agree with each other and with the tools that read them:
deploy/gateway-team.yaml, deploy/prometheus/{prometheus,alerts}.yml, deploy/systemd/*.

    pytest tests/test_gateway_deploy.py     # promtool / systemd-analyze checks skip where missing
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench.gateway.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "workbench-gateway.service"
CREDENTIALS = "/etc/prometheus/workbench-gateway.key"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_scrape_config_has_every_job_the_alert_rules_select():
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    wanted = set(re.findall(r'job="([^"]+)"', rules))
    assert wanted == {"workbench-gateway", "vllm"}
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert wanted <= set(jobs)
    assert scrape["rule_files"] == ["alerts.yml"]
    # /metrics answers 401 without a bearer credential; vLLM's does not take one
    assert jobs["workbench-gateway"]["authorization"] == {"type": "Bearer", "credentials_file": CREDENTIALS}
    assert "authorization" not in jobs["vllm"]


def test_promtool_accepts_scrape_config_and_rules(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    # promtool insists that the credentials file exists: point a copy at a stand-in key
    key = tmp_path / "gateway.key"
    key.write_text("wb-stand-in\n")
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert CREDENTIALS in text
    (tmp_path / "prometheus.yml").write_text(text.replace(CREDENTIALS, str(key)))
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path)
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"])
    assert f"{rules} rules found" in r.stdout + r.stderr  # every rule of alerts.yml was loaded


def test_team_config_binds_all_interfaces_and_points_at_vllm_host():
    cfg = load_config(DEPLOY / "gateway-team.yaml")
    assert cfg.host == "0.0.0.0" and cfg.port == 8080
    assert {name: up.base_url for name, up in cfg.upstreams.items()} == {
        "smollm2-135m-instruct": "http://vllm-host:8000/v1",
        "all-minilm-l6-v2": "http://vllm-host:8001/v1",
    }
    # the served names are the pipeline's (derived from params.yaml prepare.*.name)
    from workbench.config import load_params

    params = load_params(ROOT / "params.yaml")
    assert set(cfg.upstreams) == {params.serve.chat.model_name, params.serve.embedding.model_name}
    for words in cfg.filter.word_lists:  # relative to the unit's WorkingDirectory, the checkout
        assert (ROOT / words).is_file(), words


def test_systemd_unit_and_team_config_name_the_same_paths():
    svc = _unit(UNIT)["Service"]
    cfg = load_config(DEPLOY / "gateway-team.yaml")
    config_path = svc["ExecStart"].split("--config ")[1].split()[0]
    assert config_path == "/etc/workbench/gateway.yaml"
    assert svc["WorkingDirectory"] == "/opt/workbench"
    assert svc["ExecStart"].startswith("/opt/workbench/.venv-gateway/bin/python -m workbench.gateway ")
    assert Path(cfg.audit.path).parent == Path("/var/lib") / svc["StateDirectory"]
    assert Path(cfg.keys_file).parent == Path(config_path).parent
    assert svc["User"] == "workbench-gateway" and int(svc["LimitNOFILE"]) > cfg.limits.max_connections
    assert svc["Restart"] == "on-failure"
    prune = _unit(DEPLOY / "systemd" / "workbench-gateway-prune.service")["Service"]
    assert prune["ExecStart"] == svc["ExecStart"] + " prune"
    assert prune["User"] == svc["User"] and prune["StateDirectory"] == svc["StateDirectory"]


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed")
    # verify wants ExecStart's program to exist: point copies at this interpreter
    for src in (DEPLOY / "systemd").iterdir():
        (tmp_path / src.name).write_text(
            src.read_text().replace("/opt/workbench/.venv-gateway/bin/python", sys.executable))
    r = subprocess.run([analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "workbench-gateway" not in out, out  # unknown keys are only warnings: none allowed


def test_team_doc_names_only_files_that_exist():
    doc = (ROOT / "docs" / "gateway-team.md").read_text()
    named = set(re.findall(r"deploy/[\w./-]+\.(?:yaml|yml|json|service|timer)", doc))
    named |= {f"deploy/systemd/workbench-gateway-prune.{ext}" for ext in ("service", "timer")}
    assert {"deploy/gateway-team.yaml", "deploy/prometheus/prometheus.yml"} <= named
    assert [p for p in sorted(named) if not (ROOT / p).is_file()] == []
