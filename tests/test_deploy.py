"""``workbench deploy`` (workbench/deploy/): Kubernetes manifests rendered from params.yaml and the
reports, checked offline. Core kinds are validated against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships (strict: an unknown field fails), at the oldest and newest versions
named below; the CRDs' objects (LeaderWorkerSet, ServiceMonitor, PrometheusRule, ScaledObject)
are not in those schemas, so their required fields are checked here by hand, and the pod templates
inside a LeaderWorkerSet are validated as core PodTemplates. No cluster, kubectl or GPU.

Regenerate the committed examples (deploy/k8s/examples/) after changing the renderer::

    python tests/test_deploy.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.config import ConfigError, load_params  # noqa: E402

K8S_VERSIONS = ["1.30.0", "1.37.0"]  # a version still in wide use, and the newest the schemas cover
EXAMPLES = ROOT / "deploy" / "k8s" / "examples"
# name -> (variant, overrides): the embedded default, and two 8-GPU nodes for TP 8 x PP 2
EXAMPLE_RENDERS = {
    "default": ("base", []),
    "tp8-pp2": ("base", ["serve.chat.tensor_parallel_size=8", "serve.chat.pipeline_parallel_size=2",
                         "deploy.gpus_per_node=8"]),
}
PROJECT_FILES = ["params.yaml", "deploy/prometheus/alerts.yml", "deploy/grafana/gateway.json", "deploy/gateway.yaml"]
CRDS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"), ("keda.sh/v1alpha1", "ScaledObject")}


def make_project(dest: Path) -> Path:
    """What rendering reads, copied from this repository; no reports."""
    for rel in PROJECT_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dest / rel)
    return dest


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(make_project(tmp_path / "project"))
    return tmp_path / "project"


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def recommend(variant: str | None, reason: str = "the fastest that meets the SLO") -> Path:
    return write_json(Path("reports/report/all.json"),
                      {"schema_version": 1, "details": {"recommendation": {"variant": variant, "reason": reason}}})


def render(overrides=(), variant: str | None = None, out: str | Path = "out"):
    from workbench import deploy

    return deploy.run(load_params("params.yaml", list(overrides)), variant, out)


def docs_of(out: Path) -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(Path(out).glob("*.yaml"))}


def resources(out: Path) -> list[dict]:
    return [d for name, ds in docs_of(out).items() if name != "kustomization.yaml" for d in ds]


def one(out: Path, kind: str, name: str | None = None) -> dict:
    found = [d for d in resources(out) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {out}"
    return found[0]


# --- offline validation ---------------------------------------------------------------------------

def validate_core(doc: dict) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} invalid for Kubernetes {version}: "
                                 f"{err.message} at {'.'.join(map(str, err.path))}") from None


def _require(doc: dict, *paths: str) -> None:
    for path in paths:
        node = doc
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{doc['kind']}/{doc['metadata']['name']}: no {path}"
            node = node[part]
        assert node not in (None, "", [], {}), f"{doc['kind']}: empty {path}"


def validate_crd(doc: dict) -> None:
    """The fields each CRD's schema requires (and what its controller needs to act), by hand."""
    kind = doc["kind"]
    _require(doc, "metadata.name", "metadata.namespace", "spec")
    if kind == "LeaderWorkerSet":  # lws api/leaderworkerset/v1: leaderWorkerTemplate.workerTemplate required
        _require(doc, "spec.leaderWorkerTemplate.workerTemplate.spec.containers", "spec.leaderWorkerTemplate.size")
        lwt = doc["spec"]["leaderWorkerTemplate"]
        assert lwt["restartPolicy"] in {"RecreateGroupOnPodRestart", "None"}
        for role in ("leaderTemplate", "workerTemplate"):  # the pod templates are core objects: validate them
            validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"lws-{role}"},
                           "template": lwt[role]})
    elif kind == "ServiceMonitor":  # prometheus-operator: spec.selector and spec.endpoints
        _require(doc, "spec.selector.matchLabels", "spec.endpoints")
        for ep in doc["spec"]["endpoints"]:
            assert isinstance(ep.get("port"), str) and ep.get("path", "/metrics").startswith("/")
            if "authorization" in ep:
                assert set(ep["authorization"]["credentials"]) == {"name", "key"}
    elif kind == "PrometheusRule":  # spec.groups[].name, rules[].expr, alert xor record
        for group in doc["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule["expr"] and (("alert" in rule) != ("record" in rule)), rule
    elif kind == "ScaledObject":  # keda.sh/v1alpha1: scaleTargetRef.name, triggers[].type/metadata
        _require(doc, "spec.scaleTargetRef.name", "spec.triggers")
        for trig in doc["spec"]["triggers"]:
            assert trig["type"] == "prometheus"
            assert all(isinstance(trig["metadata"][k], str) and trig["metadata"][k]
                       for k in ("serverAddress", "query", "threshold"))
            float(trig["metadata"]["threshold"])
    else:
        raise AssertionError(f"no check for {kind}")


def validate_folder(out: Path) -> dict[str, int]:
    """Every manifest of a rendered folder; returns how many of each kind were checked which way."""
    import kubernetes_validate

    counted = {"core": 0, "crd": 0}
    for doc in resources(out):
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            validate_crd(doc)
            counted["crd"] += 1
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # really not a core schema
                kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        else:
            validate_core(doc)
            counted["core"] += 1
    return counted


def assert_kustomization_consistent(out: Path) -> None:
    """What `kubectl kustomize` needs of a folder of plain resources: every listed file exists, every
    YAML file is listed, and no two resources share kind, namespace and name."""
    kust = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    listed = kust["resources"]
    assert len(listed) == len(set(listed))
    assert all((out / r).is_file() for r in listed), [r for r in listed if not (out / r).is_file()]
    assert set(listed) == {p.name for p in out.glob("*.yaml")} - {"kustomization.yaml"}
    ids = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in resources(out)]
    assert len(ids) == len(set(ids)), sorted(ids)


# --- the two renders the issue asks for -------------------------------------------------------------

def test_embedded_default_renders_valid_manifests_from_the_real_params(project):
    recommend("base")
    result = render()
    out = Path("out")
    counted = validate_folder(out)
    assert counted == {"core": 12, "crd": 4}
    assert_kustomization_consistent(out)
    assert result.variant == "base" and not result.multi_node
    vllm = one(out, "Deployment", "vllm")
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "/models/base" in container["command"] and "smollm2-135m-instruct" in container["command"]
    assert {"ScaledObject", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget", "NetworkPolicy",
            "PersistentVolumeClaim"} <= {d["kind"] for d in resources(out)}


def test_two_nodes_of_tp8_pp2_render_a_leader_worker_set_running_vllm_on_ray(project):
    result = render(EXAMPLE_RENDERS["tp8-pp2"][1], variant="base")
    out = Path("out")
    counted = validate_folder(out)
    assert counted == {"core": 11, "crd": 5}  # the LWS replaces the vLLM Deployment
    assert_kustomization_consistent(out)
    assert result.multi_node
    assert not [d for d in resources(out) if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm"]
    lws = one(out, "LeaderWorkerSet")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]
    worker = lwt["workerTemplate"]["spec"]["containers"][0]
    for c in (leader, worker):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    script = leader["command"][2]
    assert leader["command"][:2] == ["sh", "-c"]
    assert script.index("ray start --head") < script.index("LWS_GROUP_SIZE") < script.index("exec python3 -m vllm")
    flat = " ".join(script.replace("\\\n", " ").split())
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in flat
    assert "--distributed-executor-backend ray" in flat
    assert 'ray start --address="$LWS_LEADER_ADDRESS:6379" --block' in worker["command"][2]
    assert leader["startupProbe"]["httpGet"]["path"] == "/health"
    assert one(out, "Service", "vllm")["spec"]["selector"]["workbench.io/role"] == "leader"
    assert one(out, "ScaledObject")["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"


# --- which variant, and from which report ---------------------------------------------------------

def test_the_recommended_variant_is_read_from_the_report(project):
    recommend("gptq-int4")
    result = render(out=None)
    assert result.variant == "gptq-int4" and result.out_dir == Path("deploy/k8s/gptq-int4")
    command = one(result.out_dir, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "/models/gptq-int4" in command
    assert one(result.out_dir, "Deployment", "vllm")["metadata"]["labels"]["workbench.io/variant"] == "gptq-int4"


def test_variant_flag_overrides_the_recommendation(project):
    recommend("gptq-int4")
    assert render(variant="awq-int4").variant == "awq-int4"


def test_missing_report_is_an_error_naming_the_file(project):
    from workbench.cli import main

    with pytest.raises(ConfigError, match=r"reports/report/all\.json not found.*--variant"):
        render()
    assert main(["deploy"]) == 2


def test_a_report_that_recommends_nothing_says_why(project):
    recommend(None, reason="no variant qualifies: base: fails the SLO")
    with pytest.raises(ConfigError, match="recommends no variant.*fails the SLO"):
        render()


def test_unknown_variant_is_named_with_a_suggestion(project):
    with pytest.raises(ConfigError, match="unknown variant 'gptq-int5'.*did you mean 'gptq-int4'"):
        render(variant="gptq-int5")


# --- the vLLM server ------------------------------------------------------------------------------

def test_vllm_command_is_the_serve_modules_build_command(project):
    from workbench.deploy.vllm import PORT, pod_server
    from workbench.serve import build_command

    params = load_params("params.yaml", ["serve.chat.max_num_seqs=64", "serve.chat.extra_args=[--enforce-eager]"])
    command = build_command(pod_server(params, "base"), PORT, "cuda")
    render(["serve.chat.max_num_seqs=64", "serve.chat.extra_args=[--enforce-eager]"], variant="base")
    container = one(Path("out"), "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == command
    assert command[:3] == ["python3", "-m", "vllm.entrypoints.cli.main"]
    assert ["--max-num-seqs", "64"] == command[command.index("--max-num-seqs"):][:2] and "--enforce-eager" in command
    assert ["--host", "0.0.0.0", "--port", "8000"] == command[command.index("--host"):][:4]
    # API servers from the pod's CPUs (deploy.cpu = 16 -> 2), not from the machine that renders
    assert command[command.index("--api-server-count") + 1] == "2"


def test_gpus_requested_are_tp_times_pp_on_one_node(project):
    render(["serve.chat.tensor_parallel_size=2", "serve.chat.pipeline_parallel_size=2"], variant="base")
    container = one(Path("out"), "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert ["--tensor-parallel-size", "2"] == container["command"][container["command"].index("--tensor-parallel-size"):][:2]


def test_tp_times_pp_that_does_not_fill_whole_nodes_is_an_error(project):
    with pytest.raises(ConfigError, match="TP x PP = 4 x 3 = 12 GPUs does not fill whole nodes"):
        render(["serve.chat.tensor_parallel_size=4", "serve.chat.pipeline_parallel_size=3"], variant="base")


def test_startup_probe_allows_a_margin_over_the_measured_cold_start(project):
    write_json(Path("reports/loadtest/base.json"), {"details": {"server": {"startup_s": 96.2, "device": "cuda"}}})
    render(variant="base")
    probe = one(Path("out"), "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 96.2 * 3
    assert probe["failureThreshold"] == math.ceil(96.2 * 3 / 10)
    assert "cold start 96.2 s measured on cuda (reports/loadtest/base.json)" in Path("out/vllm.yaml").read_text()


def test_startup_probe_without_a_measurement_uses_the_startup_timeout_and_says_so(project):
    render(variant="base")
    probe = one(Path("out"), "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] == 900  # serve.chat.startup_timeout_s
    assert "no measured cold start" in Path("out/vllm.yaml").read_text()


def test_probes_and_shared_memory(project):
    render(variant="base")
    pod = one(Path("out"), "Deployment", "vllm")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "workbench-models", "readOnly": True}} in pod["volumes"]


def test_init_container_storage_fetches_the_model_into_the_served_path(project):
    render(["deploy.storage.kind=init", "deploy.storage.init_source=my-org/my-model"], variant="base")
    out = Path("out")
    assert not [d for d in resources(out) if d["kind"] == "PersistentVolumeClaim"]
    pod = one(out, "Deployment", "vllm")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"] == ["hf", "download", "my-org/my-model", "--local-dir", "/models/base"]
    assert {"name": "models", "emptyDir": {}} in pod["volumes"]
    validate_folder(out)


def test_init_storage_without_a_source_names_the_keys():
    with pytest.raises(ConfigError, match="init_source"):
        load_params("params.yaml", ["deploy.storage.kind=init"])


def test_a_vllm_api_key_is_refused_rather_than_written_in_clear(project):
    with pytest.raises(ConfigError, match="serve.chat.api_key"):
        render(["serve.chat.api_key=sk-secret"], variant="base")


def test_vllm_image_tag_is_the_cuda_lock_vllm_pin():
    from workbench.config import DeployConfig

    pin = next(line.split("==")[1].strip() for line in (ROOT / "requirements/cuda.lock").read_text().splitlines()
               if line.startswith("vllm=="))
    assert DeployConfig().image == f"vllm/vllm-openai:v{pin}"


# --- gateway, autoscaling, monitoring -------------------------------------------------------------

def test_gateway_config_map_is_a_config_the_gateway_loads(project, tmp_path, monkeypatch):
    from workbench.gateway.config import load_config

    render(variant="base")
    text = one(Path("out"), "ConfigMap", "workbench-gateway")["data"]["gateway.yaml"]
    (tmp_path / "gateway.yaml").write_text(text)
    monkeypatch.chdir(ROOT)  # the image's working directory is a checkout too (deploy/gateway.Dockerfile)
    cfg = load_config(tmp_path / "gateway.yaml")  # as the gateway reads it at start, word lists included
    assert cfg.host == "0.0.0.0" and cfg.limits.backend == "redis"
    assert cfg.limits.redis_url == "redis://workbench-redis:6379/0"
    assert cfg.upstreams["smollm2-135m-instruct"].base_url == "http://vllm:8000/v1"
    assert cfg.keys_file == "/etc/workbench/keys/keys.yaml" and cfg.keys_reload_s > 0
    assert cfg.filter.word_lists  # the project's filter and moderation carried over from deploy/gateway.yaml


def test_gateway_replicas_keys_secret_and_disruption_budget(project):
    render(["deploy.gateway.replicas=3", "deploy.gateway.min_available=2"], variant="base")
    out = Path("out")
    gw = one(out, "Deployment", "workbench-gateway")
    assert gw["spec"]["replicas"] == 3
    pod = gw["spec"]["template"]["spec"]
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "workbench-gateway"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "keys")
    assert "subPath" not in mount  # a subPath mount never sees the Secret change: no key reload
    pdb = one(out, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2 and pdb["spec"]["selector"]["matchLabels"] == gw["spec"]["selector"]["matchLabels"]
    assert one(out, "Deployment", "workbench-redis") and one(out, "Service", "workbench-redis")


def test_external_redis_renders_no_redis(project):
    render(["deploy.gateway.redis_url=redis://redis.shared:6379/3"], variant="base")
    assert not [d for d in resources(Path("out")) if "redis" in d["metadata"]["name"]]
    assert "redis://redis.shared:6379/3" in one(Path("out"), "ConfigMap", "workbench-gateway")["data"]["gateway.yaml"]


def test_a_budget_that_blocks_every_drain_is_refused(project):
    with pytest.raises(ConfigError, match="min_available 2 >= replicas 2"):
        render(["deploy.gateway.min_available=2"], variant="base")


def test_autoscaling_follows_vllm_requests_waiting(project):
    render(["deploy.waiting_per_replica=8", "deploy.max_replicas=6"], variant="base")
    so = one(Path("out"), "ScaledObject")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"}
    assert so["spec"]["maxReplicaCount"] == 6
    meta = so["spec"]["triggers"][0]["metadata"]
    assert meta["query"] == 'sum(vllm:num_requests_waiting{namespace="workbench",model_name="smollm2-135m-instruct"})'
    assert meta["threshold"] == "8"
    render(["deploy.autoscaling=false"], variant="base", out="off")
    assert not [d for d in resources(Path("off")) if d["kind"] == "ScaledObject"]


def test_prometheus_rule_is_read_from_alerts_yml(project):
    alerts = yaml.safe_load(Path("deploy/prometheus/alerts.yml").read_text())
    render(variant="base")
    assert one(Path("out"), "PrometheusRule")["spec"]["groups"] == alerts["groups"]
    alerts["groups"][0]["rules"] = alerts["groups"][0]["rules"][:1]  # an edited rules file shows at once
    Path("deploy/prometheus/alerts.yml").write_text(yaml.safe_dump(alerts))
    render(variant="base")
    assert one(Path("out"), "PrometheusRule")["spec"]["groups"] == alerts["groups"]


def test_service_monitors_give_the_jobs_the_alert_rules_select(project):
    render(["deploy.prometheus_labels={release: kube-prometheus-stack}"], variant="base")
    out = Path("out")
    alerts = Path("deploy/prometheus/alerts.yml").read_text()
    for name in ("vllm", "workbench-gateway"):
        sm = one(out, "ServiceMonitor", name)
        assert f'up{{job="{name}"}}' in alerts
        label = sm["spec"]["jobLabel"]  # Prometheus' job = this label's value on the Service
        assert one(out, "Service", name)["metadata"]["labels"][label] == name
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    auth = one(out, "ServiceMonitor", "workbench-gateway")["spec"]["endpoints"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials": {"name": "workbench-gateway-metrics", "key": "token"}}
    assert one(out, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_grafana_dashboard_config_map_holds_the_dashboard(project):
    render(variant="base")
    cm = one(Path("out"), "ConfigMap", "workbench-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["gateway.json"]) == json.loads(Path("deploy/grafana/gateway.json").read_text())


def test_rendering_again_removes_files_the_new_layout_drops(project):
    render(variant="base")
    render(["deploy.autoscaling=false", "deploy.gateway.redis_url=redis://r:6379/0"], variant="base")
    assert not Path("out/autoscaling.yaml").exists() and not Path("out/redis.yaml").exists()
    assert_kustomization_consistent(Path("out"))


def test_unknown_deploy_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'deploy.gpus_per_nod'.*did you mean 'gpus_per_node'"):
        load_params("params.yaml", ["deploy.gpus_per_nod=4"])


# --- the committed examples -------------------------------------------------------------------------

def render_examples(dest: Path) -> None:
    """The examples as a fresh checkout renders them: the repository's params.yaml, no reports."""
    from workbench import deploy

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(make_project(Path(tmp)))
        try:
            for name, (variant, overrides) in EXAMPLE_RENDERS.items():
                deploy.run(load_params("params.yaml", overrides), variant, dest / name)
        finally:
            os.chdir(cwd)


def test_committed_examples_are_what_the_renderer_writes(tmp_path):
    render_examples(tmp_path)
    for name in EXAMPLE_RENDERS:
        fresh = {p.name: p.read_text() for p in (tmp_path / name).glob("*.yaml")}
        kept = {p.name: p.read_text() for p in (EXAMPLES / name).glob("*.yaml")}
        assert fresh == kept, f"deploy/k8s/examples/{name} is stale: run python tests/test_deploy.py"
        validate_folder(EXAMPLES / name)
        assert_kustomization_consistent(EXAMPLES / name)


if __name__ == "__main__":
    shutil.rmtree(EXAMPLES, ignore_errors=True)
    render_examples(EXAMPLES)
    print(f"wrote {', '.join(str(EXAMPLES / n) for n in EXAMPLE_RENDERS)}")
