"""The vLLM side of a deployment: the server pods (one Deployment, or a LeaderWorkerSet over
nodes), their Service, NetworkPolicy, model volume and KEDA autoscaling.

The server's command line is ``workbench.serve.build_command`` of the variant's server config
(``workbench.loadtest.server_config``: what the load test measured), with the pod's model path,
host and port: the flags have one home, here as on a workstation.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from workbench.config import DeployConfig, Params, ServerConfig
from workbench.deploy.k8s import DeployError, labels, meta

PORT = 8000
NAME = "vllm"  # the Service name the gateway routes to, and the label value Prometheus' job takes
RAY_PORT = 6379
PROBE_PERIOD_S = 10


@dataclass
class ColdStart:
    """How long the variant's server took to become ready, and where that number comes from."""

    seconds: float
    source: str  # one line for the manifest's comment
    measured: bool


def layout(cfg: ServerConfig, dep: DeployConfig) -> tuple[int, int]:
    """(pods per replica, GPUs per pod): one pod when TP x PP x DP fits a node, else TP x PP over
    whole nodes (vLLM's multi-node path, Ray across the pods of a LeaderWorkerSet group)."""
    gpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size * cfg.data_parallel_size
    if gpus <= dep.gpus_per_node:
        return 1, gpus
    if cfg.data_parallel_size > 1:
        raise DeployError(f"data_parallel_size {cfg.data_parallel_size} with TP x PP x DP = {gpus} GPUs over "
                          f"{dep.gpus_per_node}-GPU nodes is not rendered: scale replicas (deploy.min_replicas / "
                          "max_replicas) instead of DP across nodes")
    if gpus % dep.gpus_per_node:
        raise DeployError(f"TP x PP = {cfg.tensor_parallel_size} x {cfg.pipeline_parallel_size} = {gpus} GPUs does not "
                          f"fill whole nodes of deploy.gpus_per_node = {dep.gpus_per_node}; a multi-node group "
                          "uses every GPU of each node")
    return gpus // dep.gpus_per_node, dep.gpus_per_node


def pod_server(params: Params, variant: str) -> ServerConfig:
    """The variant's server as the load test ran it, with the pod's model path, host and port."""
    from workbench.loadtest import server_config
    from workbench.serve import api_server_count

    dep = params.deploy
    cfg = server_config(params.loadtest, variant)
    if cfg.api_key:
        raise DeployError("serve.chat.api_key would be written into the manifests in clear text; set it to null "
                          "for `workbench deploy` (--set serve.chat.api_key=null): the rendered NetworkPolicy "
                          "lets only the gateway (and Prometheus) reach vLLM")
    cfg = cfg.model_copy(update={
        "model_dir": f"{dep.storage.mount_path.rstrip('/')}/{Path(cfg.model_dir).name}",
        "host": "0.0.0.0", "port": PORT, "python": "python3", "device": "cuda",
        "api_server_count": api_server_count(cfg, "cuda", cpus=dep.cpu)})
    pods, _ = layout(cfg, dep)
    if pods > 1:  # across nodes vLLM needs Ray's executor (mp stays on one node)
        cfg = cfg.model_copy(update={"extra_args": [*cfg.extra_args, "--distributed-executor-backend", "ray"]})
    return cfg


def startup_probe(cold: ColdStart, margin: float) -> dict:
    """Kubernetes restarts a container whose startup probe fails failureThreshold x periodSeconds in a row."""
    budget = cold.seconds * margin if cold.measured else cold.seconds
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 5, "failureThreshold": max(6, math.ceil(budget / PROBE_PERIOD_S))}


def _env(cfg: ServerConfig) -> list[dict]:
    from workbench.serve import build_env

    return [{"name": k, "value": v} for k, v in sorted(build_env(cfg, "cuda", base={}).items())]


def _resources(dep: DeployConfig, gpus: int) -> dict:
    # An extended resource (nvidia.com/gpu) is set in limits; requests default to them.
    return {"requests": {"cpu": str(dep.cpu), "memory": dep.memory},
            "limits": {"memory": dep.memory, "nvidia.com/gpu": str(gpus)}}


def _volumes(dep: DeployConfig) -> list[dict]:
    st = dep.storage
    models = ({"name": "models", "persistentVolumeClaim": {"claimName": st.pvc_name, "readOnly": True}}
              if st.kind == "pvc" else {"name": "models", "emptyDir": {}})
    return [models, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": dep.shm_size}}]


def _mounts(dep: DeployConfig) -> list[dict]:
    return [{"name": "models", "mountPath": dep.storage.mount_path, "readOnly": dep.storage.kind == "pvc"},
            {"name": "dshm", "mountPath": "/dev/shm"}]


def _init_containers(dep: DeployConfig, cfg: ServerConfig) -> list[dict]:
    st = dep.storage
    if st.kind != "init":
        return []
    command = st.init_command or ["hf", "download", st.init_source, "--local-dir", cfg.model_dir]
    return [{"name": "fetch-model", "image": st.init_image or dep.image, "command": command,
             "volumeMounts": [{"name": "models", "mountPath": st.mount_path}]}]


def server_container(cfg: ServerConfig, dep: DeployConfig, gpus: int, cold: ColdStart,
                     command: list[str]) -> dict:
    health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    return {
        "name": "vllm", "image": dep.image, "command": command,
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": _env(cfg),
        "resources": _resources(dep, gpus),
        "startupProbe": startup_probe(cold, dep.startup_margin),
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": _mounts(dep),
    }


def deployment(params: Params, variant: str, cold: ColdStart) -> dict:
    """One vLLM pod per replica, with every GPU the server's TP x PP x DP asks for."""
    from workbench.serve import build_command

    dep, cfg = params.deploy, pod_server(params, variant)
    _, gpus = layout(cfg, dep)
    pod_labels = labels(NAME, variant, component="server")
    spec = {
        "terminationGracePeriodSeconds": int(cfg.shutdown_grace_s) + 10,
        "initContainers": _init_containers(dep, cfg),
        "containers": [server_container(cfg, dep, gpus, cold, build_command(cfg, PORT, "cuda"))],
        "volumes": _volumes(dep),
    }
    if not spec["initContainers"]:
        del spec["initContainers"]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(NAME, dep, pod_labels),
        "spec": {
            "replicas": dep.min_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            # No spare GPUs assumed: an update stops a pod before its replacement takes the GPUs.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": pod_labels}, "spec": spec},
        },
    }


def leader_worker_set(params: Params, variant: str, cold: ColdStart) -> dict:
    """vLLM across nodes as its docs deploy it on Kubernetes: a LeaderWorkerSet group per replica;
    the leader starts Ray's head, waits for every worker pod to join, then runs the server with
    Ray's executor; each worker runs `ray start --address=<leader>` and blocks."""
    from workbench.serve import build_command

    dep, cfg = params.deploy, pod_server(params, variant)
    pods, gpus = layout(cfg, dep)
    serve = shlex.join(build_command(cfg, PORT, "cuda")).replace(" --", " \\\n  --")
    alive = "python3 -c 'import ray; ray.init(address=\"auto\"); print(sum(n[\"Alive\"] for n in ray.nodes()))'"
    # LWS sets LWS_GROUP_SIZE (pods in the group) and LWS_LEADER_ADDRESS (the leader's DNS name).
    leader_cmd = (f"set -e\nray start --head --port={RAY_PORT}\n"
                  f"until [ \"$({alive})\" -ge \"$LWS_GROUP_SIZE\" ]; do echo waiting for Ray workers; sleep 5; done\n"
                  f"exec {serve}\n")
    worker_cmd = (f"until ray start --address=\"$LWS_LEADER_ADDRESS:{RAY_PORT}\" --block; do\n"
                  "  echo waiting for the Ray head; sleep 5\ndone\n")
    leader = server_container(cfg, dep, gpus, cold, ["sh", "-c", leader_cmd])
    leader["ports"].append({"name": "ray", "containerPort": RAY_PORT})
    worker = {"name": "vllm-worker", "image": dep.image, "command": ["sh", "-c", worker_cmd],
              "env": _env(cfg), "resources": _resources(dep, gpus), "volumeMounts": _mounts(dep)}

    def template(role: str, container: dict) -> dict:
        spec = {"initContainers": _init_containers(dep, cfg), "containers": [container], "volumes": _volumes(dep),
                "terminationGracePeriodSeconds": int(cfg.shutdown_grace_s) + 10}
        if not spec["initContainers"]:
            del spec["initContainers"]
        return {"metadata": {"labels": {**labels(NAME, variant, component="server"), "workbench.io/role": role}},
                "spec": spec}

    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": meta(NAME, dep, labels(NAME, variant, component="server")),
        "spec": {
            "replicas": dep.min_replicas,
            "leaderWorkerTemplate": {
                "size": pods,
                # one pod lost breaks the Ray cluster and the NCCL groups: restart the whole group
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": template("leader", leader),
                "workerTemplate": template("worker", worker),
            },
        },
    }


def service(dep: DeployConfig, variant: str, multi_node: bool) -> dict:
    selector = {"app.kubernetes.io/name": NAME, **({"workbench.io/role": "leader"} if multi_node else {})}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(NAME, dep, labels(NAME, variant, "server")),
            "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}


def network_policy(dep: DeployConfig, variant: str, gateway_name: str) -> dict:
    """vLLM checks no keys here: only the gateway, Prometheus and the server's own pods reach it."""
    port = [{"port": PORT, "protocol": "TCP"}]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": meta(NAME, dep, labels(NAME, variant, "server")),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": gateway_name}}}], "ports": port},
                {"from": [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": dep.monitoring_namespace}}}], "ports": port},
                # Ray and NCCL between the pods of a multi-node group (any port)
                {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": NAME}}}]},
            ],
        },
    }


def model_claim(dep: DeployConfig, variant: str) -> dict | None:
    st = dep.storage
    if st.kind != "pvc" or not st.create_pvc:
        return None
    spec = {"accessModes": [st.access_mode], "resources": {"requests": {"storage": st.pvc_size}}}
    if st.storage_class:
        spec["storageClassName"] = st.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": meta(st.pvc_name, dep, labels("models", variant, "storage")), "spec": spec}


def scaled_object(dep: DeployConfig, variant: str, served_name: str, multi_node: bool) -> dict | None:
    """KEDA: replicas = ceil(requests waiting / waiting_per_replica), between the bounds.

    KEDA over HPA + prometheus-adapter: the PromQL query and threshold live in this one namespaced
    object, where the adapter needs a rule in its cluster-wide config that this folder cannot own,
    and KEDA scales any target with a /scale subresource, the LeaderWorkerSet included (as vLLM's
    production-stack does it)."""
    if not dep.autoscaling:
        return None
    target = ({"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": NAME} if multi_node
              else {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME})
    query = f'sum(vllm:num_requests_waiting{{namespace="{dep.namespace}",model_name="{served_name}"}})'
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": meta(NAME, dep, labels(NAME, variant, "autoscaling")),
        "spec": {
            "scaleTargetRef": target,
            "minReplicaCount": dep.min_replicas, "maxReplicaCount": dep.max_replicas,
            "pollingInterval": 15,
            # A replica takes its cold start to help: keep it for 5 min after the queue drains.
            "cooldownPeriod": 300,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": 300}}}},
            "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": dep.prometheus_url, "query": query,
                "threshold": f"{dep.waiting_per_replica:g}"}}],
        },
    }
