"""``workbench deploy``: Kubernetes manifests for the report's recommended variant, as a Kustomize
folder that ``kubectl apply -k`` takes. Rendering reads files only (params, reports, the alert
rules and dashboard) and needs no GPU, cluster, kubectl or Helm::

    workbench deploy                                  # the recommendation in reports/report/all.json
    workbench deploy --variant gptq-int4              # another variant
    workbench deploy --variant base --set serve.chat.tensor_parallel_size=8 \\
        --set serve.chat.pipeline_parallel_size=2     # 16 GPUs: a LeaderWorkerSet over two 8-GPU nodes

Output: ``deploy.out_dir/<variant>/`` (``--out`` overrides): namespace, model volume, vLLM
(Deployment, or LeaderWorkerSet with Ray when TP x PP exceeds ``deploy.gpus_per_node``), Service,
NetworkPolicy, KEDA ScaledObject, gateway (ConfigMap, Deployment, Service, PodDisruptionBudget),
Redis, ServiceMonitors, PrometheusRule and the Grafana dashboard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from workbench import variants
from workbench.config import BASE_VARIANT, Params, _suggest
from workbench.deploy import gateway, monitoring, vllm
from workbench.deploy.k8s import DeployError, dump, labels
from workbench.deploy.vllm import ColdStart
from workbench.reports import report_path

log = logging.getLogger(__name__)
REPORT = report_path("report", variants.ALL)
LOADTEST_REPORTS = Path("reports/loadtest")
KUSTOMIZATION = "kustomization.yaml"
EXAMPLES = "examples"  # deploy/k8s/examples/: rendered examples kept in git (tests/test_deploy.py)

__all__ = ["DeployError", "DeployResult", "render", "run"]


@dataclass
class DeployResult:
    variant: str
    out_dir: Path
    files: list[str]  # kustomization.yaml first, then its resources in order
    multi_node: bool
    cold_start: ColdStart
    texts: dict[str, str] = field(default_factory=dict, repr=False)


def recommended_variant(path: Path = REPORT) -> str:
    if not path.is_file():
        raise DeployError(f"{path} not found: run the report stage first (dvc repro report), "
                          "or name the variant: workbench deploy --variant base")
    try:
        decision = json.loads(path.read_text())["details"]["recommendation"]
    except (ValueError, KeyError, TypeError) as err:
        raise DeployError(f"{path} has no details.recommendation ({type(err).__name__}: {err}); "
                          "re-run the report stage, or name the variant with --variant") from None
    if not decision.get("variant"):
        raise DeployError(f"{path} recommends no variant ({decision.get('reason', 'no reason given')}); "
                          "name one with --variant")
    return decision["variant"]


def cold_start(params: Params, variant: str, reports: Path = LOADTEST_REPORTS) -> ColdStart:
    """The server's measured start-to-ready time for ``variant`` (details.server.startup_s of its
    load-test report, where ``VLLMServer`` records it), else serve.chat.startup_timeout_s."""
    path = reports / f"{variant}.json"
    try:
        server = json.loads(path.read_text())["details"]["server"]
        seconds, device = float(server["startup_s"]), server.get("device", "?")
    except (OSError, ValueError, KeyError, TypeError):
        fallback = params.loadtest.server.startup_timeout_s
        return ColdStart(fallback, f"no measured cold start ({path} absent or without details.server.startup_s), "
                                   f"so serve.chat.startup_timeout_s = {fallback:g} s", measured=False)
    return ColdStart(seconds, f"cold start {seconds:.1f} s measured on {device} ({path}) "
                              f"x deploy.startup_margin {params.deploy.startup_margin:g}", measured=True)


def _known_variants(params: Params) -> list[str]:
    return [BASE_VARIANT, *params.quantize.variants, *params.loadtest.server_overrides]


def render(params: Params, variant: str, cold: ColdStart) -> dict[str, str]:
    """file name -> YAML text, kustomization.yaml first. Pure: reads only the alert rules, the
    dashboard and the gateway config."""
    dep = params.deploy
    server = vllm.pod_server(params, variant)
    pods, gpus = vllm.layout(server, dep)
    multi = pods > 1
    served = server.model_name
    probe = vllm.startup_probe(cold, dep.startup_margin)
    shape = (f"TP {server.tensor_parallel_size} x PP {server.pipeline_parallel_size}"
             f"{f' x DP {server.data_parallel_size}' if server.data_parallel_size > 1 else ''}")
    layout = (f"a LeaderWorkerSet group of {pods} pods x {gpus} GPUs per replica (Ray across nodes)" if multi
              else f"a Deployment, {gpus} GPU(s) per pod")
    files: dict[str, tuple[str, list[dict]]] = {}
    files["namespace.yaml"] = ("", [{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": dep.namespace, "labels": {"app.kubernetes.io/part-of": "llm-workbench"}}}])
    if (claim := vllm.model_claim(dep, variant)) is not None:
        files["models.yaml"] = (
            f"The variant's folder goes in this volume once, at <volume>/{variant}/ ({variants.model_dir(variant)} of the\n"
            f"project), e.g. through a pod that mounts it: kubectl cp {variants.model_dir(variant)} "
            f"<pod>:{dep.storage.mount_path}/",
            [claim])
    server_obj = (vllm.leader_worker_set if multi else vllm.deployment)(params, variant, cold)
    files["vllm.yaml"] = (
        f"vLLM for variant {variant} (served as {served}): {shape}, {layout}.\n"
        f"Command: workbench.serve.build_command of the variant's server config (serve.chat).\n"
        f"startupProbe: {probe['failureThreshold']} x {probe['periodSeconds']} s = "
        f"{probe['failureThreshold'] * probe['periodSeconds']} s: {cold.source}."
        + ("\nNeeds the LeaderWorkerSet controller (leaderworkerset.x-k8s.io/v1) in the cluster." if multi else ""),
        [server_obj, vllm.service(dep, variant, multi), vllm.network_policy(dep, variant, gateway.NAME)])
    if (scaler := vllm.scaled_object(dep, variant, served, multi)) is not None:
        files["autoscaling.yaml"] = (
            f"vLLM replicas = ceil(requests waiting / {dep.waiting_per_replica:g}), {dep.min_replicas}..{dep.max_replicas}.\n"
            "Needs KEDA (keda.sh/v1alpha1) and the Prometheus at deploy.prometheus_url. KEDA rather than HPA +\n"
            "prometheus-adapter: the query lives in this namespaced object, not in the adapter's cluster-wide rules.",
            [scaler])
    gw_cfg = gateway.gateway_config(params, served)
    gw_text = yaml.safe_dump(gw_cfg, sort_keys=False, allow_unicode=True)
    files["gateway.yaml"] = (
        f"The gateway: {dep.gateway.replicas} replicas sharing their limits in Redis, keys from Secret "
        f"{dep.gateway.keys_secret}.\nIts audit log is per pod, on an emptyDir: rows live as long as the pod "
        "(export them with `export-audit`).",
        [gateway.config_map(dep, variant, gw_text), gateway.deployment(dep, variant, gw_cfg, gw_text),
         gateway.service(dep, variant), gateway.disruption_budget(dep, variant)])
    if redis := gateway.redis(dep, variant):
        files["redis.yaml"] = ("Redis for the gateway's shared limits (deploy.gateway.redis_url: null).", redis)
    files["monitoring.yaml"] = (
        "Needs the Prometheus Operator (monitoring.coreos.com/v1). The rules are deploy/prometheus/alerts.yml.",
        [*monitoring.service_monitors(dep, variant), monitoring.prometheus_rule(dep, variant)])
    files["grafana-dashboard.yaml"] = ("deploy/grafana/gateway.json, for Grafana's dashboard sidecar.",
                                       [monitoring.dashboard(dep, variant)])
    texts = {KUSTOMIZATION: dump([{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                   "resources": list(files)}], _kustomization_header(params, variant, served))}
    note = "Rendered by `workbench deploy` from params.yaml and the reports; edit those and render again."
    texts.update({name: dump(docs, f"{note}\n{head}" if head else note) for name, (head, docs) in files.items()})
    return texts


def _kustomization_header(params: Params, variant: str, served: str) -> str:
    dep, g = params.deploy, params.deploy.gateway
    return f"""\
LLM Workbench on Kubernetes: variant {variant}, served as "{served}". Rendered by `workbench deploy`.
Before `kubectl apply -k <this folder>`, create the two Secrets it reads (never rendered here):
  workbench gateway --config deploy/gateway.yaml add-key team-a --rpm 600 --tpm 200000   # keys_file: SHA-256s only
  workbench gateway --config deploy/gateway.yaml add-key prometheus --metrics > metrics.key
  kubectl -n {dep.namespace} create secret generic {g.keys_secret} \\
    --from-file=keys.yaml=runs/gateway/keys.yaml --from-literal=audit-secret="$(openssl rand -hex 32)"
  kubectl -n {dep.namespace} create secret generic {g.metrics_secret} --from-file=token=metrics.key
New keys later: re-create {g.keys_secret} (kubectl create ... --dry-run=client -o yaml | kubectl apply -f -);
the gateway re-reads keys.yaml once the kubelet has updated the mounted Secret, without a restart.
Cluster add-ons it expects: the NVIDIA device plugin (nvidia.com/gpu), the Prometheus Operator,
KEDA (autoscaling), and LeaderWorkerSet for a multi-node variant."""


def run(params: Params, variant: str | None = None, out: str | Path | None = None,
        report: Path = REPORT, loadtest_reports: Path = LOADTEST_REPORTS) -> DeployResult:
    """Render and write the manifests; returns where they went."""
    variant = variant or params.deploy.variant or recommended_variant(report)
    known = _known_variants(params)
    if variant not in known:
        raise DeployError(f"unknown variant '{variant}'{_suggest(variant, known)}; known: {', '.join(known)}")
    cold = cold_start(params, variant, loadtest_reports)
    texts = render(params, variant, cold)
    if not out and variant == EXAMPLES:
        raise DeployError(f"variant '{EXAMPLES}' would overwrite {params.deploy.out_dir}/{EXAMPLES}/ (the committed "
                          "examples); pass --out")
    out_dir = Path(out) if out else Path(params.deploy.out_dir) / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.yaml"):  # a variant that moved to a LeaderWorkerSet drops its old files
        if stale.name not in texts:
            stale.unlink()
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    server = vllm.pod_server(params, variant)
    multi = vllm.layout(server, params.deploy)[0] > 1
    log.info("deploy %s: %d files in %s (%s; startup probe: %s)", variant, len(texts), out_dir,
             "LeaderWorkerSet" if multi else "Deployment", cold.source)
    return DeployResult(variant, out_dir, list(texts), multi, cold, texts)
