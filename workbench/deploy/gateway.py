"""The gateway side of a deployment: its config (ConfigMap), replicas (Deployment), Service,
PodDisruptionBudget, and the Redis that lets the replicas share one set of limits.

The config is the project's gateway config (``loadtest.gateway_config``, deploy/gateway.yaml:
filter, moderation, limits) with what the cluster decides put over it: listen address, the vLLM
Service as the one upstream, the keys file from a Secret, Redis, the audit path. It is checked
with the gateway's own config model before anything is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from workbench.config import DeployConfig, Params
from workbench.deploy.k8s import DeployError, labels, meta
from workbench.deploy.vllm import NAME as VLLM, PORT as VLLM_PORT

NAME = "workbench-gateway"
REDIS = "workbench-redis"
PORT = 8080
CONFIG_DIR = "/etc/workbench/config"
KEYS_DIR = "/etc/workbench/keys"
AUDIT_DIR = "/var/lib/workbench-gateway"
AUDIT_SECRET_ENV = "WORKBENCH_GATEWAY_AUDIT_SECRET"


def gateway_config(params: Params, served_name: str) -> dict:
    from workbench.gateway.config import GatewayConfig, GatewayConfigError

    dep, src = params.deploy, Path(params.loadtest.gateway_config)
    if not src.is_file():
        raise DeployError(f"gateway config not found: {src} (loadtest.gateway_config); the deployed gateway starts from it")
    cfg = yaml.safe_load(src.read_text()) or {}
    redis_url = dep.gateway.redis_url or f"redis://{REDIS}:6379/0"
    cfg.update({
        "host": "0.0.0.0", "port": PORT, "workers": dep.gateway.workers,
        # one Service in front of every vLLM replica: kube-proxy spreads the gateway's connections
        "upstreams": {served_name: {"base_url": f"http://{VLLM}:{VLLM_PORT}/v1"}},
        "keys": [], "keys_file": f"{KEYS_DIR}/keys.yaml",
        "limits": {**cfg.get("limits", {}), "backend": "redis", "redis_url": redis_url},
        # per pod, on an emptyDir: rows live as long as the pod (see the Deployment's comment)
        "audit": {**cfg.get("audit", {}), "path": f"{AUDIT_DIR}/audit.sqlite",
                  "hash_secret_env": AUDIT_SECRET_ENV},
    })
    try:
        GatewayConfig.model_validate(cfg).model_routes()
    except (ValueError, GatewayConfigError) as err:
        raise DeployError(f"the gateway config rendered from {src} is invalid: {err}") from None
    return cfg


def config_map(dep: DeployConfig, variant: str, text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(NAME, dep, labels(NAME, variant, "gateway")),
            "data": {"gateway.yaml": text}}


def deployment(dep: DeployConfig, variant: str, cfg: dict, config_text: str) -> dict:
    g = dep.gateway
    pod_labels = labels(NAME, variant, "gateway")
    http = {"port": "http"}
    grace = int((cfg.get("http") or {}).get("graceful_shutdown_s", 10)) + 5
    container = {
        "name": "gateway", "image": g.image,
        "command": ["python", "-m", "workbench.gateway", "--config", f"{CONFIG_DIR}/gateway.yaml"],
        "ports": [{"name": "http", "containerPort": PORT}],
        # every replica hashes audited prompts with one key, so hashes compare across replicas
        "env": [{"name": AUDIT_SECRET_ENV, "valueFrom": {"secretKeyRef": {"name": g.keys_secret, "key": "audit-secret"}}}],
        "resources": {"requests": {"cpu": g.cpu, "memory": g.memory}, "limits": {"memory": g.memory}},
        # /ready fails while audit rows cannot be written: such a replica leaves the Service
        "readinessProbe": {"httpGet": {**http, "path": "/ready"}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {**http, "path": "/health"}, "periodSeconds": 10, "failureThreshold": 3},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         # a directory, not subPath: the kubelet updates it when the Secret changes,
                         # and the gateway re-reads keys.yaml (keys_reload_s) without a restart
                         {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
                         {"name": "audit", "mountPath": AUDIT_DIR}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    spread = {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                 "labelSelector": {"matchLabels": {"app.kubernetes.io/name": NAME}}}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(NAME, dep, pod_labels),
        "spec": {
            "replicas": g.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                # a changed config changes this hash, and so rolls the replicas
                "metadata": {"labels": pod_labels, "annotations": {
                    "workbench.io/config-sha256": hashlib.sha256(config_text.encode()).hexdigest()}},
                "spec": {
                    "terminationGracePeriodSeconds": grace,
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [spread]}},
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": NAME}},
                        {"name": "keys", "secret": {"secretName": g.keys_secret,
                                                    "items": [{"key": "keys.yaml", "path": "keys.yaml"}]}},
                        {"name": "audit", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def service(dep: DeployConfig, variant: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(NAME, dep, labels(NAME, variant, "gateway")),
            "spec": {"selector": {"app.kubernetes.io/name": NAME},
                     "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}


def disruption_budget(dep: DeployConfig, variant: str) -> dict:
    if dep.gateway.min_available >= dep.gateway.replicas:
        raise DeployError(f"deploy.gateway.min_available {dep.gateway.min_available} >= replicas "
                          f"{dep.gateway.replicas}: no node holding a gateway could ever be drained")
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(NAME, dep, labels(NAME, variant, "gateway")),
            "spec": {"minAvailable": dep.gateway.min_available,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}}}}


def redis(dep: DeployConfig, variant: str) -> list[dict]:
    """Buckets and revocations only: a restart refills every bucket, so no persistence."""
    if dep.gateway.redis_url:
        return []
    lbls = labels(REDIS, variant, "limits")
    ping = {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 10}
    pod = {"containers": [{
        "name": "redis", "image": dep.gateway.redis_image,
        "args": ["--save", "", "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": 6379}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": ping, "livenessProbe": ping,
    }]}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(REDIS, dep, lbls),
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": REDIS}},
                  "template": {"metadata": {"labels": lbls}, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(REDIS, dep, lbls),
         "spec": {"selector": {"app.kubernetes.io/name": REDIS},
                  "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]}},
    ]
