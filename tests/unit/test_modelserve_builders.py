"""Rendered children of a ModelServe: golden files per vendor, adapters never touch the
RayService, serving placement and sizing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import load_example, merge_patch
from localcluster import HACK, build_fleet_nodes, load_fleet
from test_builders import dump
from tuneserve.modelserve.adapters import resolve_adapters
from tuneserve.api.modelserve import ModelServe
from tuneserve.api.conditions import RejectionCode
from tuneserve.modelserve.builders.rayservice import build_rayservice, raycluster_scaling_patch
from tuneserve.modelserve.builders.children import build_modelserve_children
from tuneserve.modelserve.builders.rbac import build_serve_rbac
from tuneserve.modelserve.builders.serve import endpoint_url
from tuneserve.core.catalog import load_catalog
from tuneserve.core.scheduling.inventory import build_inventory
from tuneserve.core.scheduling.fit import Candidate, Outcome
from tuneserve.modelserve.placement import decide_serve_placement
from tuneserve.core.sizing.model import model_shape
from tuneserve_workers import contract
from tuneserve_workers.contract import ServeAdapter

GOLDEN = Path(__file__).parent / "golden"
CATALOG = load_catalog()
INVENTORY = build_inventory(build_fleet_nodes(load_fleet(HACK / "fleet.yaml")), [])
CHOICES = {
    "h100": {"vendor": "nvidia", "product": "H100"},
    "mi300x": {"vendor": "amd", "product": "MI300X"},
    "ascend910b": {"vendor": "huawei", "product": "Ascend910B"},
    "gaudi2": {"vendor": "intel", "product": "Gaudi2"},
}
SUCCEEDED_FIN_V1 = {
    "apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "fin-v1", "namespace": "bank"},
    "spec": load_example("finetunejob-qwen-bank.yaml")["spec"],
    "status": {"phase": "Succeeded", "artifact": {"uri": "s3://bank/adapters/fin-v1", "baseModel": "hf://Qwen/Qwen2.5-7B-Instruct",
                                                  "method": "lora", "rank": 16}},
}


def bank_serve(choice: dict | None = None, **spec_patch) -> ModelServe:
    body = load_example("modelserve-qwen-bank.yaml")
    body["metadata"].update(uid="5e7a0c1d-0000-4000-8000-000000000002", generation=1)
    patch = dict(spec_patch)
    if choice:
        patch["accelerators"] = {"choices": [choice]}
    return ModelServe.from_body(merge_patch(body, {"spec": patch}))


def render(serve: ModelServe) -> list[dict]:
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    assert decision.outcome == Outcome.Placed, decision.reason
    desired = resolve_adapters(serve.spec, {"fin-v1": SUCCEEDED_FIN_V1}).desired
    return build_modelserve_children(serve, decision.candidate, decision.pool, desired, CATALOG)


# Goldens render from literal inputs: one device per replica of each vendor (the pool is named after it), the two
# adapters the example lists (the FineTuneJob one resolved); not through placement or the fleet.
GOLDEN_PROFILES = {"h100": "nvidia/h100-80gb", "mi300x": "amd/mi300x", "ascend910b": "huawei/ascend910b", "gaudi2": "intel/gaudi2"}
GOLDEN_ADAPTERS = [ServeAdapter(name="fin-v1", uri="s3://bank/adapters/fin-v1"),
                   ServeAdapter(name="support-v3", uri="s3://bank/adapters/support-v3")]


@pytest.mark.parametrize("name", sorted(GOLDEN_PROFILES))
def test_golden(name):
    candidate = Candidate(CATALOG.get(GOLDEN_PROFILES[name]), 1, 1, "choice 1")
    rendered = dump(build_modelserve_children(bank_serve(CHOICES[name]), candidate, name, GOLDEN_ADAPTERS, CATALOG))
    path = GOLDEN / f"modelserve-{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(rendered)
    assert path.exists(), "missing golden file: run with UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), f"{path.name} differs: review, then UPDATE_GOLDEN=1"


def _rayservice(objects):
    return next(o for o in objects if o["kind"] == "RayService")


def _adapters(objects):
    return next(o for o in objects if o["metadata"]["name"].endswith("-adapters"))


def test_adapter_changes_never_touch_the_rayservice():
    """The critical property: adapters live only in the adapters ConfigMap."""
    one = render(bank_serve())
    other = render(bank_serve(adapters=[{"name": "only-this", "uri": "gs://other/adapter"}]))
    none = render(bank_serve(adapters=[]))
    assert _rayservice(one) == _rayservice(other) == _rayservice(none)
    assert _adapters(one) != _adapters(other)
    assert json.loads(_adapters(other)["data"]["adapters.json"]) == [{"name": "only-this", "uri": "gs://other/adapter"}]
    assert "only-this" not in json.dumps(_rayservice(other))


def test_replica_changes_keep_the_cluster_hash():
    """KubeRay hashes rayClusterConfig without replicas/min/max: scaling never makes a new cluster."""
    def hashed(rs):
        spec = json.loads(json.dumps(rs["spec"]["rayClusterConfig"]))
        for group in spec["workerGroupSpecs"]:
            for key in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(key, None)
        return spec
    a = _rayservice(render(bank_serve()))
    b = _rayservice(render(bank_serve(replicas={"min": 2, "max": 8, "targetOngoingRequests": 4})))
    assert hashed(a) == hashed(b) and a["spec"]["serveConfigV2"] != b["spec"]["serveConfigV2"]


def test_adapters_configmap_resolves_succeeded_job():
    cm = _adapters(render(bank_serve()))
    assert cm["metadata"]["name"] == "bank-llm-adapters"
    assert json.loads(cm["data"][contract.ADAPTERS_KEY]) == [
        {"name": "fin-v1", "uri": "s3://bank/adapters/fin-v1"}, {"name": "support-v3", "uri": "s3://bank/adapters/support-v3"}]


def test_rayservice_shape_for_h100():
    objects = render(bank_serve(CHOICES["h100"]))
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "ConfigMap", "RayService"]
    rs = _rayservice(objects)
    assert rs["apiVersion"] == "ray.io/v1" and rs["metadata"]["name"] == "bank-llm"
    spec = rs["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert spec["serveService"]["metadata"]["name"] == "bank-llm-openai"
    assert spec["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 8000}]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "tuneserve_workers.serve.app:build_app" and app["route_prefix"] == "/"
    cfg = contract.ServeAppConfig.model_validate(app["args"])
    assert cfg.adapters == [] and cfg.adapters_file == "/etc/tuneserve/adapters/adapters.json"
    assert cfg.status_configmap == "bank/bank-llm-serve-status" and cfg.tensor_parallel_size == 1 and cfg.device == "cuda"
    (deployment,) = app["deployments"]
    assert deployment["name"] == contract.SERVE_DEPLOYMENT_NAME
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0}
    assert deployment["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (1, 4, 1)
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["containers"][0]["image"] == "ghcr.io/tuneserve/serve:0.1.0-cuda12.8"
    assert {"name": "tuneserve-adapters", "mountPath": "/etc/tuneserve/adapters", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert {"name": "tuneserve-adapters", "configMap": {"name": "bank-llm-adapters"}} in pod["volumes"]
    assert pod["serviceAccountName"] == "bank-llm-serve"


@pytest.mark.parametrize("name,plugin,plugins_env,resources", [
    ("ascend910b", "ascend", "ascend,ascend_enhanced_model,ascend_kv_connector", {"NPU": 1}),
    ("gaudi2", "hpu", "hpu,01.hpu_custom_utils,02.hpu_custom_ops,03.hpu_custom_models", {"HPU": 1})])
def test_vendor_plugin_and_ray_resources(name, plugin, plugins_env, resources):
    rs = _rayservice(render(bank_serve(CHOICES[name])))
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["vllm_plugin"] == plugin
    assert app["deployments"][0]["ray_actor_options"] == {"num_cpus": 1, "resources": resources}
    env = {e["name"]: e.get("value") for e in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_PLUGINS"] == plugins_env
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"] == {"resources": '"{\\"%s\\": 1}"' % next(iter(resources))}


def test_neuron_plugin_from_catalog():
    profile = CATALOG.get("aws/inf2")
    assert profile.vllm_plugin == "neuron"
    rs = build_rayservice(bank_serve(), Candidate(profile, 2, 1, "test"), None, CATALOG)
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["ray_actor_options"]["resources"] == {"neuron_cores": 4}
    assert app["args"]["device"] == "neuron"


def test_secrets_are_references_and_user_env_cannot_override():
    with pytest.raises(ValueError, match="TUNESERVE_ are reserved"):      # refused at admission
        bank_serve(env=[{"name": "TUNESERVE_ADAPTERS_FILE", "value": "/tmp/evil"}])
    serve = bank_serve(env=[{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}])
    env = _rayservice(render(serve))["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert by_name["TUNESERVE_ADAPTERS_FILE"]["value"] == contract.ADAPTERS_FILE
    assert by_name["VLLM_LOGGING_LEVEL"]["value"] == "DEBUG"


def test_serve_rbac_is_limited_to_its_configmaps():
    _, role, binding = build_serve_rbac(bank_serve())
    assert [r["resourceNames"] for r in role["rules"]] == [["bank-llm-serve-status"], ["bank-llm-adapters"]]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bank-llm-serve", "namespace": "bank"}]


def test_endpoint_url():
    assert endpoint_url(bank_serve()) == "http://bank-llm-openai.bank.svc.cluster.local:8000/v1"


def live_cluster(**group) -> dict:
    return {"spec": {"workerGroupSpecs": [{"groupName": "nvidia-h100-80gb", "minReplicas": 1, "maxReplicas": 4, **group}]}}


def ops(patch, op) -> dict:
    return {p["path"].removeprefix("/spec/workerGroupSpecs/0/"): p["value"] for p in patch if p["op"] == op}


def test_scaling_patch_for_the_live_cluster():
    assert raycluster_scaling_patch(bank_serve(), live_cluster(replicas=3)) is None
    assert raycluster_scaling_patch(bank_serve(), {"spec": {}}) is None
    patch = raycluster_scaling_patch(bank_serve(replicas={"min": 2, "max": 8}), live_cluster(replicas=3))
    assert patch[0] == {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "nvidia-h100-80gb"}
    # Guarded by the values it was computed from; replicas 3 is within 2..8: the autoscaler's.
    assert ops(patch, "test") == {"groupName": "nvidia-h100-80gb", "minReplicas": 1, "maxReplicas": 4}
    assert ops(patch, "replace") == {"minReplicas": 2, "maxReplicas": 8}
    assert [p["op"] for p in patch] == ["test"] * 3 + ["replace"] * 2, "every test before the first change"


def test_scaling_patch_clamps_replicas_only_outside_the_new_bounds():
    below = raycluster_scaling_patch(bank_serve(replicas={"min": 2, "max": 4}), live_cluster(replicas=1))
    assert ops(below, "replace") == {"minReplicas": 2, "replicas": 2} and ops(below, "test")["replicas"] == 1
    above = raycluster_scaling_patch(bank_serve(replicas={"min": 1, "max": 2}), live_cluster(replicas=4))
    assert ops(above, "replace") == {"maxReplicas": 2, "replicas": 2}
    unset = raycluster_scaling_patch(bank_serve(replicas={"min": 2, "max": 4}), live_cluster())
    assert "replicas" not in ops(unset, "replace") | ops(unset, "add"), "no replicas: KubeRay uses minReplicas"
    to_zero = raycluster_scaling_patch(bank_serve(replicas={"min": 0, "max": 4}), live_cluster(replicas=1))
    assert ops(to_zero, "replace") == {"minReplicas": 0}


def test_scaling_patch_adds_bounds_the_live_group_lacks():
    patch = raycluster_scaling_patch(bank_serve(), {"spec": {"workerGroupSpecs": [{"groupName": "g", "replicas": 1}]}})
    assert ops(patch, "add") == {"minReplicas": 1, "maxReplicas": 4} and ops(patch, "test") == {"groupName": "g"}


# --- placement and sizing ------------------------------------------------------------------

def test_quantization_unsupported_by_vendor_falls_through():
    serve = bank_serve(engine={"quantization": "awq"}, accelerators={"choices": [{"product": "Gaudi2"}, {"product": "MI300X"}]})
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    assert decision.outcome == Outcome.Placed and decision.candidate.profile.key == "amd/mi300x"
    (rejection,) = decision.rejections
    assert rejection.code == RejectionCode.Unsupported
    assert "Intel Gaudi2 96GB does not support awq quantization for serving (supports: fp8)" in rejection.message


def test_auto_tensor_parallel_grows_with_the_model():
    serve = bank_serve(baseModel={"uri": "hf://Qwen/Qwen2.5-72B-Instruct"}, adapters=[])
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    assert decision.outcome == Outcome.Placed and decision.tensor_parallel_size == 4 and decision.tensor_parallel_auto
    mi = decide_serve_placement(bank_serve(CHOICES["mi300x"], baseModel={"uri": "hf://Qwen/Qwen2.5-72B-Instruct"}).spec, CATALOG, INVENTORY)
    assert mi.tensor_parallel_size == 1


def test_too_small_is_rejected_with_the_arithmetic():
    serve = bank_serve({"product": "L4"}, baseModel={"uri": "hf://Qwen/Qwen2.5-72B-Instruct"}, engine={"tensorParallelSize": 1})
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    assert decision.outcome == Outcome.Unplaceable
    message = decision.rejections[0].message
    assert decision.rejections[0].code == RejectionCode.InsufficientMemory
    assert "Qwen2.5-72B-Instruct with tensorParallelSize 1 needs" in message and "weights 134.1" in message and "NVIDIA L4 24GB gives vLLM" in message


def test_fp8_halves_the_weights():
    from tuneserve.core.sizing.serving import estimate_serving_memory
    shape = model_shape(bank_serve().spec.base_model)
    profile = CATALOG.get("nvidia/h100-80gb")
    plain = estimate_serving_memory(shape, bank_serve().spec.engine, profile, CATALOG, 1)
    fp8 = estimate_serving_memory(shape, bank_serve(engine={"quantization": "fp8"}).spec.engine, profile, CATALOG, 1)
    assert fp8.weights_gib == pytest.approx(plain.weights_gib / 2) and fp8.kv_room_tokens > plain.kv_room_tokens


def _app_config(serve: ModelServe) -> dict:
    rs = next(c for c in render(serve) if c["kind"] == "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]


@pytest.mark.parametrize("choice,engine,dtype", [
    ({"vendor": "cpu"}, {}, "float32"),                    # the CPU profile's catalog default
    ({"vendor": "cpu"}, {"dtype": "bfloat16"}, "bfloat16"),  # the spec wins
    (CHOICES["h100"], {}, "auto"),                           # accelerators: the model's own
    (CHOICES["mi300x"], {"dtype": "float16"}, "float16"),
])
def test_engine_dtype_is_the_specs_else_the_accelerators(choice, engine, dtype):
    serve = bank_serve(choice, baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, engine=engine, adapters=[])
    assert _app_config(serve)["dtype"] == dtype


def test_float32_doubles_the_weights_and_kv_cache():
    from tuneserve.core.sizing.serving import estimate_serving_memory
    shape = model_shape(bank_serve().spec.base_model)
    profile = CATALOG.get("nvidia/h100-80gb")
    half = estimate_serving_memory(shape, bank_serve().spec.engine, profile, CATALOG, 1)
    full = estimate_serving_memory(shape, bank_serve(engine={"dtype": "float32"}).spec.engine, profile, CATALOG, 1)
    assert full.weights_gib == pytest.approx(2 * half.weights_gib)
    assert full.kv_min_gib == pytest.approx(2 * half.kv_min_gib)
    cpu = CATALOG.get("cpu/cpu")
    unset = estimate_serving_memory(shape, bank_serve().spec.engine, cpu, CATALOG, 1)
    bf16 = estimate_serving_memory(shape, bank_serve(engine={"dtype": "bfloat16"}).spec.engine, cpu, CATALOG, 1)
    assert unset.weights_gib == pytest.approx(2 * bf16.weights_gib)   # CPU default: float32


def _env_names(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_direct_ingress_is_the_default_and_pins_the_replica_to_the_serve_port():
    rs = _rayservice(render(bank_serve()))
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for container in (head, worker):     # the controller (head) and the replicas read them
        env = _env_names(container)
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8000", "8001")
    # KubeRay's worker readiness probe and serve Service find the port by this name
    assert {"name": "serve", "containerPort": 8000} in worker["ports"]
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    assert rs["spec"]["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 8000}]


def test_proxy_ingress_keeps_ray_serve_defaults():
    rs = _rayservice(render(bank_serve(ingress="Proxy")))
    cluster = rs["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        env = _env_names(group["template"]["spec"]["containers"][0])
        assert not {k for k in env if k.startswith("RAY_SERVE_")}
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is False


def test_unknown_ingress_is_refused():
    with pytest.raises(Exception, match="ingress"):
        bank_serve(ingress="Sidecar")


def _pod_ray_resources(group: dict, profile) -> dict:
    """What Ray sees on one worker pod: KubeRay maps a limit ending in "gpu" to num-gpus; other
    accelerators come from rayStartParams.resources."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    if profile.ray_resource_auto_mapped:
        return {profile.ray_resource: int(limits[profile.resource_name])}
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw[1:-1].replace('\\"', '"')) if raw else {}   # "{\\"NPU\\": 8}" quoted


@pytest.mark.parametrize("key", [p.key for p in CATALOG.profiles if p.memory_scope == "device"])
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_a_replica_uses_every_device_its_pod_reserves(key, tp):
    """tensorParallelSize = the devices the worker pod requests = the Ray resources the replica actor
    holds = the pod's Ray resources: nothing reserved sits idle, nothing is asked for twice."""
    profile = CATALOG.get(key)
    rs = build_rayservice(bank_serve(), Candidate(profile, tp, 1, "test"), None, CATALOG)
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert app["args"]["tensor_parallel_size"] == tp and limits[profile.resource_name] == str(tp)
    actor = app["deployments"][0]["ray_actor_options"]
    held = {"GPU": actor["num_gpus"]} if "num_gpus" in actor else actor.get("resources", {})
    assert held == _pod_ray_resources(group, profile) == {profile.ray_resource: tp * profile.ray_resources_per_device}


def test_a_cpu_replica_computes_on_every_core_its_pod_reserves():
    """Worker-scoped (CPU): the engine is not sharded (tensor_parallel_size 1) and the replica holds
    the pod's cores as Ray CPUs."""
    cpu = CATALOG.get("cpu/cpu")
    rs = build_rayservice(bank_serve(), Candidate(cpu, 4, 1, "test"), None, CATALOG)
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["tensor_parallel_size"] == 1 and app["deployments"][0]["ray_actor_options"] == {"num_cpus": 4}


def test_serve_pods_are_locked_down_without_the_training_drain():
    """Serving pods get the same securityContext as training pods; no checkpoint to drain into,
    so Kubernetes' default grace period and no preStop."""
    cluster = _rayservice(render(bank_serve()))["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
        assert "terminationGracePeriodSeconds" not in pod
        for container in pod["containers"]:
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
            assert "lifecycle" not in container
