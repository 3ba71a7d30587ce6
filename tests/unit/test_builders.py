"""Rendered children of a FineTuneJob: golden files per vendor, determinism, secrets, RBAC."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from helpers import load_example, merge_patch
from localcluster import HACK, build_fleet_nodes, load_fleet
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.finetunejob.builders.config import build_train_config
from tuneserve.finetunejob.builders.rayjob import build_rayjob
from tuneserve.finetunejob.builders.rbac import build_worker_rbac
from tuneserve.core.catalog import load_catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve.core.scheduling.inventory import build_inventory
from tuneserve.finetunejob.status import placement_status
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.finetunejob.placement import candidate_from_status, decide_placement
from tuneserve_workers import contract

GOLDEN = Path(__file__).parent / "golden"
CATALOG = load_catalog()
INVENTORY = build_inventory(build_fleet_nodes(load_fleet(HACK / "fleet.yaml")), [])
CHOICES = {
    "h100": {"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 2},
    "mi300x": {"vendor": "amd", "product": "MI300X", "devicesPerWorker": 8, "workers": 1},
    "ascend910b": {"vendor": "huawei", "product": "Ascend910B", "devicesPerWorker": 8, "workers": 2},
    "gaudi2": {"vendor": "intel", "product": "Gaudi2", "devicesPerWorker": 8, "workers": 1},
}


def bank_job(choice: dict | None = None, **spec_patch) -> FineTuneJob:
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(uid="3f1c2a9e-0000-4000-8000-000000000001", generation=1)
    patch = dict(spec_patch)
    if choice:
        patch["accelerators"] = {"choices": [choice]}
    return FineTuneJob.from_body(merge_patch(body, {"spec": patch}))


def render(job: FineTuneJob, attempt: int = 1) -> list[dict]:
    decision = decide_placement(job.spec, CATALOG, INVENTORY)
    assert decision.outcome == Outcome.Placed, decision.reason
    return build_finetune_children(job, decision.candidate, decision.pool, attempt, CATALOG)


class _GoldenDumper(yaml.SafeDumper):
    """Readable goldens: multi-line strings (the config JSON) as literal blocks."""


_GoldenDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(objects: list[dict]) -> str:
    text = yaml.dump_all(objects, Dumper=_GoldenDumper, sort_keys=True, width=120)
    assert "&id" not in text, "builders must not share sub-objects between places"
    return text


# Goldens render from literal inputs (KubeRay's rbac_test.go style): the candidate and the pool are
# written out, so a golden changes when a builder does, not when placement or hack/fleet.yaml does.
GOLDEN_CASES = {   # name: (catalog profile, devices per worker, workers, pool)
    "h100": ("nvidia/h100-80gb", 8, 2, "h100"),
    "mi300x": ("amd/mi300x", 8, 1, "mi300x"),
    "ascend910b": ("huawei/ascend910b", 8, 2, "ascend910b"),
    "gaudi2": ("intel/gaudi2", 8, 1, "gaudi2"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name):
    key, per_worker, workers, pool = GOLDEN_CASES[name]
    candidate = Candidate(CATALOG.get(key), per_worker, workers, "choice 1")
    rendered = dump(build_finetune_children(bank_job(CHOICES[name]), candidate, pool, 1, CATALOG))
    path = GOLDEN / f"finetunejob-{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(rendered)
    assert path.exists(), "missing golden file: run with UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), f"{path.name} differs: review, then UPDATE_GOLDEN=1"


def _worker(rayjob):
    return rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def test_rayjob_shape_for_h100():
    objects = render(bank_job(CHOICES["h100"]))
    kinds = [o["kind"] for o in objects]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "ConfigMap", "RayJob"]
    rayjob = objects[-1]
    assert rayjob["metadata"]["name"] == "fin-v1-1" and rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 2
    assert spec["entrypoint"] == "python -m tuneserve_workers.train --config /etc/tuneserve/config.json"
    group = _worker(rayjob)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["rayStartParams"] == {}  # nvidia.com/gpu -> num-gpus by KubeRay
    pod = group["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "tuneserve.dev/pool": "h100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "training" and pod["serviceAccountName"] == "fin-v1-worker"
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["controller"] is True and owner["uid"].startswith("3f1c2a9e")
    assert rayjob["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "tuneserve", "tuneserve.dev/finetunejob": "fin-v1", "tuneserve.dev/attempt": "1"}


@pytest.mark.parametrize("name,ray_resources", [("ascend910b", '"{\\"NPU\\": 8}"'), ("gaudi2", '"{\\"HPU\\": 8}"')])
def test_custom_ray_resources_for_non_gpu(name, ray_resources):
    group = _worker(render(bank_job(CHOICES[name]))[-1])
    assert group["rayStartParams"] == {"resources": ray_resources}


def test_secrets_are_references_only_and_env_is_ordered():
    rayjob = render(bank_job())[-1]
    env = _worker(rayjob)["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert "value" not in by_name["AWS_SECRET_ACCESS_KEY"]
    assert by_name[contract.CONFIG_ENV]["value"] == "/etc/tuneserve/config.json"
    assert by_name[contract.PROGRESS_CONFIGMAP_ENV]["value"] == "bank/fin-v1-progress"
    assert by_name["HF_HUB_ENABLE_HF_TRANSFER"]["value"] == "1"


def test_user_env_cannot_override_operator_env():
    with pytest.raises(ValueError, match="TUNESERVE_ are reserved"):      # refused at admission
        bank_job(env=[{"name": "TUNESERVE_CONFIG", "value": "/tmp/evil"}])
    job = bank_job(env=[{"name": "HF_TOKEN", "value": "x"}])
    env = _worker(render(job)[-1])["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "TUNESERVE_CONFIG"] == [{"name": "TUNESERVE_CONFIG", "value": "/etc/tuneserve/config.json"}]
    assert len([e for e in env if e["name"] == "HF_TOKEN"]) == 1


def test_image_override_per_vendor():
    job = bank_job(imageOverrides={"nvidia": "registry.bank/train:cuda"})
    container = _worker(render(job)[-1])["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.bank/train:cuda"


def test_config_configmap_holds_the_contract():
    objects = render(bank_job(CHOICES["ascend910b"]))
    config = next(o for o in objects if o["metadata"]["name"] == "fin-v1-1-config")
    cfg = contract.TrainJobConfig.model_validate_json(config["data"]["config.json"])
    assert cfg.base_model.uri == "hf://Qwen/Qwen2.5-7B-Instruct" and cfg.output_uri == "s3://bank/adapters/fin-v1"
    assert (cfg.accelerator.torch_device, cfg.accelerator.distributed_backend, cfg.accelerator.ray_resource) == ("npu", "hccl", "NPU")
    assert cfg.accelerator.workers == 2 and cfg.accelerator.devices_per_worker == 8 and cfg.accelerator.ray_resources_per_worker == 8
    assert cfg.checkpoint.interval_minutes == 10 and cfg.checkpoint.uri == "s3://bank/checkpoints/fin-v1"
    assert "hf-token" not in config["data"]["config.json"]  # no secret names/values in the config either


def test_rbac_is_limited_to_the_progress_configmap():
    job = bank_job()
    sa, role, binding = build_worker_rbac(job)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["fin-v1-progress"],
                              "verbs": ["get", "update", "patch"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fin-v1-worker", "namespace": "bank"}]
    own = bank_job(serviceAccountName="bank-training")
    objects = build_worker_rbac(own)
    assert [o["kind"] for o in objects] == ["Role", "RoleBinding"] and objects[1]["subjects"][0]["name"] == "bank-training"


def test_attempts_get_distinct_rayjobs():
    job = bank_job()
    decision = decide_placement(job.spec, CATALOG, INVENTORY)
    first = build_rayjob(job, decision.candidate, decision.pool, 1, CATALOG)
    second = build_rayjob(job, decision.candidate, decision.pool, 2, CATALOG)
    assert first["metadata"]["name"] == "fin-v1-1" and second["metadata"]["name"] == "fin-v1-2"
    assert second["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "fin-v1-2-config"


def test_suspend_passes_through():
    assert render(bank_job(suspend=True))[-1]["spec"]["suspend"] is True


@pytest.mark.parametrize("model,choice,data_parallel,world_size,recompute", [
    ("hf://Qwen/Qwen2.5-7B-Instruct", CHOICES["h100"], "replicated", 16, False),   # a copy fits one H100, without recompute
    ("hf://Qwen/Qwen2.5-72B-Instruct", CHOICES["h100"], "sharded", 16, True),      # it does not: FSDP2 over 16
    ("hf://Qwen/Qwen2.5-72B-Instruct", CHOICES["mi300x"], "replicated", 8, True),  # 192 GiB hold a copy, with recompute
])
def test_config_carries_the_sizing_decision(model, choice, data_parallel, world_size, recompute):
    """The worker reads how to share the model from the config, rendered from the placement; after a
    restart the candidate rebuilt from status renders the same bytes."""
    job = bank_job(choice, baseModel={"uri": model})
    decision = decide_placement(job.spec, CATALOG, INVENTORY)
    def config_of(candidate):
        return next(o for o in build_finetune_children(job, candidate, decision.pool, 1, CATALOG)
                    if o["metadata"]["name"] == "fin-v1-1-config")
    config = config_of(decision.candidate)
    cfg = contract.TrainJobConfig.model_validate_json(config["data"]["config.json"])
    assert cfg.accelerator.data_parallel.value == data_parallel and cfg.accelerator.world_size == world_size
    assert cfg.training.gradient_checkpointing is recompute
    recorded = placement_status(decision, 1, job.metadata.name, datetime(2026, 9, 1, tzinfo=timezone.utc))
    assert recorded.to_wire()["gradientCheckpointing"] is recompute
    restarted = candidate_from_status(type(recorded).model_validate(recorded.to_wire()), CATALOG)
    assert config_of(restarted) == config


@pytest.mark.parametrize("training,candidate_recompute,base_precision", [
    ({"basePrecision": "fp8"}, False, contract.BasePrecision.fp8),
    ({"gradientCheckpointing": True}, True, None),
])
def test_config_carries_the_fp8_base_and_the_resolved_recompute(training, candidate_recompute, base_precision):
    """gradient_checkpointing comes from the candidate (the sizing's decision), never the spec's
    unset field; basePrecision and the profile's fp8 pass through."""
    job = bank_job(CHOICES["h100"], training=training)
    candidate = Candidate(CATALOG.get("nvidia/h100-80gb"), 8, 2, "choice 1", gradient_checkpointing=candidate_recompute)
    cfg = build_train_config(job, candidate, 1)
    assert cfg.training.gradient_checkpointing is candidate_recompute
    assert cfg.training.base_precision == base_precision and cfg.accelerator.supports_fp8 is True
    assert cfg.adapter.dropout == 0.05   # the bank example sets it; the API's default is 0
    a100 = build_train_config(job, Candidate(CATALOG.get("nvidia/a100-80gb"), 8, 2, "choice 1"), 1)
    assert a100.accelerator.supports_fp8 is False


def _ray_pods(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_training_pods_drain_into_a_checkpoint_and_are_locked_down(name):
    """Every Ray pod of a job: a grace period long enough for the emergency checkpoint, a preStop
    that signals the training processes (the pod's SIGTERM reaches only ``ray start``), and the
    restricted securityContext the worker images allow (they run as root: no runAsNonRoot)."""
    from tuneserve.builders.raycluster import DRAIN_PRE_STOP, TRAIN_TERMINATION_GRACE_S
    from tuneserve_workers.train.drain import DEFAULT_DRAIN_DIR, DRAIN_DIR_ENV
    key, per_worker, workers, pool = GOLDEN_CASES[name]
    rayjob = build_rayjob(bank_job(CHOICES[name]), Candidate(CATALOG.get(key), per_worker, workers, "c"), pool, 1, CATALOG)
    assert TRAIN_TERMINATION_GRACE_S >= 120
    assert f"${{{DRAIN_DIR_ENV}:-{DEFAULT_DRAIN_DIR}}}" in DRAIN_PRE_STOP   # the workers' directory
    for pod in _ray_pods(rayjob):
        assert pod["terminationGracePeriodSeconds"] == TRAIN_TERMINATION_GRACE_S
        assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
        (container,) = pod["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "-c", DRAIN_PRE_STOP]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert "runAsNonRoot" not in container["securityContext"] and "runAsUser" not in pod["securityContext"]
