"""What the report decides, and what follows from its recommendation: ``report`` (with each arm's
price) and ``deploy`` (Kubernetes manifests for the recommended variant)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workbench.config.base import Section
# Imported by these names: several configs have fields called ``variants`` and ``model_dir``.
from workbench.variants import BASE as BASE_VARIANT


class PriceConfig(Section):
    """What one arm costs (workbench/cost.py), one of two kinds:

    - self-hosted (a workbench variant on vLLM, llama.cpp, a gateway arm): ``per_gpu_hour`` times
      ``gpus``, paid whether the machine is busy or not (a CPU-only machine: its hourly price as
      ``per_gpu_hour`` with ``gpus: 1``);
    - hosted (a URL arm): ``per_million_input_tokens`` and ``per_million_output_tokens``, paid per
      token whatever the rate.

    Prices are the provider's list prices in ``currency``; nothing here converts currencies."""

    per_gpu_hour: float | None = Field(default=None, ge=0)
    gpus: int = Field(default=1, ge=1)  # GPUs the arm holds (tensor x pipeline x data parallel)
    per_million_input_tokens: float | None = Field(default=None, ge=0)
    per_million_output_tokens: float | None = Field(default=None, ge=0)
    currency: str = "USD"

    @model_validator(mode="after")
    def _one_kind(self) -> "PriceConfig":
        hosted = (self.per_million_input_tokens, self.per_million_output_tokens)
        if self.per_gpu_hour is None and None in hosted:
            raise ValueError("a price is per_gpu_hour (self-hosted) or both per_million_input_tokens and "
                             "per_million_output_tokens (hosted)")
        if self.per_gpu_hour is not None and any(v is not None for v in hosted):
            raise ValueError("per_gpu_hour and per-token prices both set: an arm is self-hosted or hosted, "
                             "not both")
        return self

    @property
    def kind(self) -> Literal["self-hosted", "hosted"]:
        return "self-hosted" if self.per_gpu_hour is not None else "hosted"


class ReportConfig(Section):
    """What the report compares and how it decides (all thresholds here, none in code)."""

    # In table order; a variant without reports shows as missing (gptq-int3: quantize's numbers only).
    # None: base and every quantize.variants key, in that order (filled by Params).
    variants: list[str] | None = None
    # The variant the tables compare every other with ("perplexity vs base", "mmlu vs base"). Its
    # one home is evaluate.baseline (whose per-question records the comparison pairs with): Params
    # fills it in, and refuses a params.yaml that sets it to something else.
    baseline: str | None = BASE_VARIANT
    accuracy_metric: Literal["mmlu_acc", "ceval_acc"] = "mmlu_acc"  # what "best accuracy" means
    # The load the variant must carry within the load test's SLO (loadtest.slo: the one home of
    # the thresholds); a variant shown to fail it there is not recommended.
    target_rate_req_per_s: float = Field(default=1.0, gt=0)
    memory_budget_bytes: float | None = Field(default=None, gt=0)  # size on disk; None: no limit
    # No "broken" threshold here: a variant is broken when the quantize stage's check says so
    # (quantize.check.broken_ppl_ratio), and the report reads that verdict (workbench/recommend.py).
    # Sizes within this share of the smallest are a tie (a few % of metadata is not a saving).
    size_tie_pct: float = Field(default=5.0, ge=0)
    # What each compared arm costs, keyed by arm name (a variant, "<variant>@gateway", a llama.cpp or
    # URL arm's name); an arm without a price has no cost figure. {}: costs are not reported.
    prices: dict[str, PriceConfig] = {}
    # Costs within this share of the cheapest are a tie in the recommender's cost tie-break
    # (workbench/recommend.py): a price list's rounding is not a saving.
    cost_tie_pct: float = Field(default=5.0, ge=0)


class DeployStorageConfig(Section):
    """Where the vLLM pods read the variant's folder (models/<variant>): at <mount_path>/<variant>."""

    # pvc: a volume that holds the models/ folders (copy models/<variant> into it once); every
    # vLLM pod mounts it read-only, so several replicas or nodes need ReadWriteMany / ReadOnlyMany.
    # init: an init container downloads `init_source` (a hub id) into an emptyDir on every start.
    kind: Literal["pvc", "init"] = "pvc"
    mount_path: str = "/models"
    pvc_name: str = "workbench-models"
    create_pvc: bool = True  # False: the claim pvc_name exists already
    pvc_size: str = "50Gi"
    storage_class: str | None = None  # None: the cluster's default
    access_mode: Literal["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"] = "ReadWriteMany"
    init_image: str | None = None  # None: deploy.image (vLLM's image carries the `hf` CLI)
    init_source: str | None = None  # kind init: hub id `hf download` fetches, e.g. org/name
    # kind init: the init container's command instead of `hf download` (e.g. an `aws s3 sync`);
    # it must leave the model in <mount_path>/<variant>.
    init_command: list[str] | None = None

    @model_validator(mode="after")
    def _init_needs_a_source(self) -> "DeployStorageConfig":
        if self.kind == "init" and not (self.init_source or self.init_command):
            raise ValueError("storage.kind 'init' needs storage.init_source (a hub id) or storage.init_command")
        return self


class DeployGatewayConfig(Section):
    """The gateway (workbench/gateway) in front of vLLM: replicas sharing their limits in Redis."""

    # Built from deploy/gateway.Dockerfile (the gateway extra only: no vLLM, no torch).
    image: str = "workbench-gateway:0.1.0"
    replicas: int = Field(default=2, ge=1)
    min_available: int = Field(default=1, ge=0)  # PodDisruptionBudget: replicas kept through a drain
    workers: int = Field(default=1, ge=1)  # processes per pod (the gateway's `workers`)
    cpu: str = "1"
    memory: str = "1Gi"
    # The Secret holding keys.yaml (the gateway's keys_file: SHA-256s only) and audit-secret (the
    # HMAC key every replica hashes prompts with). Created by you, never rendered: see the
    # kustomization's header. The gateway re-reads keys.yaml when the Secret changes.
    keys_secret: str = "workbench-gateway"
    # The Secret holding `token`: a metrics key (add-key prometheus --metrics) for the ServiceMonitor.
    metrics_secret: str = "workbench-gateway-metrics"
    redis_url: str | None = None  # None: a Redis Deployment + Service is rendered beside the gateway
    redis_image: str = "redis:7.4-alpine"


class DeployConfig(Section):
    """``workbench deploy``: Kubernetes manifests (Kustomize) for one variant, from the report's
    recommendation and these params. Rendering reads files only; nothing talks to a cluster."""

    variant: str | None = None  # None: reports/report/all.json's recommendation; --variant overrides
    out_dir: str = "deploy/k8s"  # manifests go to <out_dir>/<variant>/ (--out overrides)
    namespace: str = "workbench"
    image: str = "vllm/vllm-openai:v0.26.0"  # the tag of requirements/cuda.lock's vllm pin
    # GPUs on one node. TP x PP x DP up to it: one Deployment; above it, a LeaderWorkerSet of
    # TP x PP / gpus_per_node pods joined by Ray (vLLM's multi-node path).
    gpus_per_node: int = Field(default=8, ge=1)
    cpu: int = Field(default=16, ge=1)  # per vLLM pod; sets the API-server count as `workbench serve` does
    memory: str = "64Gi"
    shm_size: str = "16Gi"  # /dev/shm (emptyDir, medium Memory): NCCL and the engine's workers use it
    # The startup probe allows this many times the measured cold start (the variant's load-test
    # report); without one, serve.chat.startup_timeout_s.
    startup_margin: float = Field(default=3.0, ge=1)
    storage: DeployStorageConfig = DeployStorageConfig()
    gateway: DeployGatewayConfig = DeployGatewayConfig()
    # KEDA ScaledObject: vLLM replicas (LeaderWorkerSet groups) follow vLLM's queue, one replica
    # per `waiting_per_replica` requests waiting, from min_replicas to max_replicas.
    autoscaling: bool = True
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    waiting_per_replica: float = Field(default=5, gt=0)
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"  # what KEDA queries
    monitoring_namespace: str = "monitoring"  # Prometheus' namespace: the NetworkPolicy lets it scrape vLLM
    # Labels your Prometheus selects ServiceMonitors and PrometheusRules by (kube-prometheus-stack:
    # release: <its Helm release>); {}: none.
    prometheus_labels: dict[str, str] = {}

    @model_validator(mode="after")
    def _replica_bounds(self) -> "DeployConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self
