"""What the Prometheus Operator and Grafana pick up: two ServiceMonitors, the project's alert
rules as a PrometheusRule, and the gateway dashboard as a ConfigMap for Grafana's sidecar.

The rules and the dashboard are read from deploy/prometheus/alerts.yml and deploy/grafana/gateway.json
at render time, never copied: edit them there. The ServiceMonitors take Prometheus' ``job`` label
from ``app.kubernetes.io/name`` (jobLabel), so it is ``vllm`` and ``workbench-gateway``, the jobs
the rules select (``up{job="vllm"}``), as with deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from workbench.config import DeployConfig
from workbench.deploy import gateway, vllm
from workbench.deploy.k8s import DeployError, labels, meta

ALERTS = Path("deploy/prometheus/alerts.yml")
DASHBOARD = Path("deploy/grafana/gateway.json")
JOB_LABEL = "app.kubernetes.io/name"


def _read(path: Path) -> str:
    if not path.is_file():
        raise DeployError(f"{path} not found: run `workbench deploy` from the project's root")
    return path.read_text()


def service_monitors(dep: DeployConfig, variant: str) -> list[dict]:
    def monitor(name: str, endpoint: dict) -> dict:
        return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                "metadata": meta(name, dep, {**labels(name, variant, "monitoring"), **dep.prometheus_labels}),
                "spec": {"jobLabel": JOB_LABEL, "selector": {"matchLabels": {JOB_LABEL: name}},
                         "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s", **endpoint}]}}

    return [
        monitor(vllm.NAME, {}),  # vLLM serves /metrics without a key
        # The gateway's /metrics takes a metrics key only (add-key ID --metrics), from a Secret.
        monitor(gateway.NAME, {"authorization": {"type": "Bearer", "credentials": {
            "name": dep.gateway.metrics_secret, "key": "token"}}}),
    ]


def prometheus_rule(dep: DeployConfig, variant: str, path: Path = ALERTS) -> dict:
    rules = yaml.safe_load(_read(path)) or {}
    if not rules.get("groups"):
        raise DeployError(f"{path} holds no rule groups")
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": meta("workbench", dep, {**labels("workbench", variant, "monitoring"), **dep.prometheus_labels}),
            "spec": {"groups": rules["groups"]}}


def dashboard(dep: DeployConfig, variant: str, path: Path = DASHBOARD) -> dict:
    text = _read(path)
    json.loads(text)  # a broken dashboard fails here, not in Grafana's sidecar log
    # grafana_dashboard: "1" is the label kube-prometheus-stack's Grafana sidecar collects.
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta("workbench-grafana-dashboard", dep,
                             {**labels("workbench", variant, "monitoring"), "grafana_dashboard": "1"}),
            "data": {path.name: text}}
