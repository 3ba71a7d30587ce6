"""Volumes of the Ray pods: every PersistentVolumeClaim a pvc:// URI names, at the path the
workers resolve it to, and the catalog's host volumes; table-driven on literal inputs."""
from __future__ import annotations

import pytest

from helpers import load_example, merge_patch
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.modelserve import ModelServe
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.modelserve.builders.children import build_modelserve_children
from tuneserve.builders.raycluster import host_volumes, pvc_volumes
from tuneserve.core.catalog import load_catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve_workers import contract
from tuneserve_workers.contract import ServeAdapter
from tuneserve_workers.train import storage

LOCAL_CPU = {"vendors": {"cpu": {"podVolumes": [
    {"name": "worker-venv", "hostPath": "/opt/tuneserve/venv", "mountPath": "/opt/tuneserve/venv"},
    {"name": "scratch", "hostPath": "/var/tmp/tuneserve", "mountPath": "/scratch", "readOnly": False},
]}}}


def _claim(index: int, claim: str, read_only: bool) -> tuple[dict, dict]:
    name = f"tuneserve-pvc-{index}"
    return ({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}},
            {"name": name, "mountPath": f"/mnt/pvc/{claim}", "readOnly": read_only})


@pytest.mark.parametrize("read,written,expected", [
    ([], [], []),
    (["s3://bank/data.jsonl", "hf://Qwen/Qwen2.5-7B"], ["gs://b/out"], []),
    (["pvc://data/sft.jsonl"], [], [("data", True)]),
    (["pvc://models/qwen"], ["pvc://models/out"], [("models", False)]),      # written wins
    (["pvc://b.c/x", "pvc://a/y"], ["pvc://a/z"], [("a", False), ("b.c", True)]),
    (["pvc://data/x", "pvc://data/y/"], [], [("data", True)]),                # one mount per claim
])
def test_pvc_volumes(read, written, expected):
    pairs = [_claim(i, claim, ro) for i, (claim, ro) in enumerate(expected)]
    assert pvc_volumes(read, written) == ([v for v, _ in pairs], [m for _, m in pairs])


def test_the_mount_is_where_the_worker_looks(monkeypatch):
    monkeypatch.delenv(contract.PVC_ROOT_ENV, raising=False)
    (_, (mount,)) = pvc_volumes(["pvc://bank-data/sft/train.jsonl"], [])
    assert storage.local_path("pvc://bank-data/sft/train.jsonl") == f"{mount['mountPath']}/sft/train.jsonl"


def test_host_volumes_from_the_catalog():
    profile = load_catalog(LOCAL_CPU).get("cpu/cpu")
    assert host_volumes(profile) == (
        [{"name": "worker-venv", "hostPath": {"path": "/opt/tuneserve/venv"}},
         {"name": "scratch", "hostPath": {"path": "/var/tmp/tuneserve"}}],
        [{"name": "worker-venv", "mountPath": "/opt/tuneserve/venv", "readOnly": True},
         {"name": "scratch", "mountPath": "/scratch", "readOnly": False}])
    assert host_volumes(load_catalog().get("cpu/cpu")) == ([], [])


def _job(**spec) -> FineTuneJob:
    body = merge_patch(load_example("finetunejob-qwen-bank.yaml"), {"spec": spec})
    return FineTuneJob.from_body({**body, "metadata": {"name": "fin-v1", "namespace": "bank", "uid": "u1"}})


def _pods(obj: dict) -> list[dict]:
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return pods + ([spec["submitterPodTemplate"]["spec"]] if "submitterPodTemplate" in spec else [])


def _mounts(pod: dict) -> dict[str, dict]:
    (container,) = pod["containers"]
    by_volume = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: {**by_volume[m["name"]], "readOnly": m.get("readOnly", False)} for m in container["volumeMounts"]}


def test_finetunejob_mounts_its_claims_in_every_ray_pod():
    job = _job(baseModel={"uri": "pvc://models/qwen2.5-7b"}, dataset={"uri": "pvc://bank-data/sft.jsonl"},
               output={"uri": "pvc://adapters/fin-v1"}, checkpoint={"uri": "pvc://scratch/ckpt"})
    catalog = load_catalog()
    rayjob = build_finetune_children(job, Candidate(catalog.get("cpu/cpu"), 2, 2, "t"), None, 1, catalog)[-1]
    assert "submitterPodTemplate" not in rayjob["spec"], "no host volumes: KubeRay's default submitter"
    for pod in _pods(rayjob):
        mounts = _mounts(pod)
        assert {path: (m["persistentVolumeClaim"]["claimName"], m["readOnly"]) for path, m in mounts.items()
                if "persistentVolumeClaim" in m} == {
            "/mnt/pvc/adapters": ("adapters", False), "/mnt/pvc/bank-data": ("bank-data", True),
            "/mnt/pvc/models": ("models", True), "/mnt/pvc/scratch": ("scratch", False)}


def test_modelserve_mounts_base_model_and_adapter_claims_read_only():
    body = merge_patch(load_example("modelserve-qwen-bank.yaml"), {"spec": {
        "baseModel": {"uri": "pvc://models/qwen2.5-7b"}, "adapters": [{"name": "a", "uri": "pvc://adapters/a"}]}})
    serve = ModelServe.from_body({**body, "metadata": {"name": "bank-llm", "namespace": "bank", "uid": "u2"}})
    catalog = load_catalog()
    desired = [ServeAdapter(name="a", uri="pvc://adapters/a"), ServeAdapter(name="fin-v1", uri="pvc://trained/fin-v1")]
    rayservice = build_modelserve_children(serve, Candidate(catalog.get("cpu/cpu"), 2, 1, "t"), None, desired, catalog)[-1]
    for pod in _pods(rayservice):
        claims = {path: (m["persistentVolumeClaim"]["claimName"], m["readOnly"]) for path, m in _mounts(pod).items()
                  if "persistentVolumeClaim" in m}
        assert claims == {"/mnt/pvc/adapters": ("adapters", True), "/mnt/pvc/models": ("models", True),
                          "/mnt/pvc/trained": ("trained", True)}


@pytest.mark.parametrize("kind", ["FineTuneJob", "ModelServe"])
def test_host_volumes_in_every_ray_pod_and_the_submitter(kind):
    catalog = load_catalog(LOCAL_CPU)
    candidate = Candidate(catalog.get("cpu/cpu"), 2, 1, "t")
    if kind == "FineTuneJob":
        obj = build_finetune_children(_job(), candidate, None, 1, catalog)[-1]
        assert obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == "ghcr.io/tuneserve/train:0.1.0-cpu"
    else:
        serve = ModelServe.from_body({**load_example("modelserve-qwen-bank.yaml"),
                                      "metadata": {"name": "bank-llm", "namespace": "bank", "uid": "u2"}})
        obj = build_modelserve_children(serve, candidate, None, [], catalog)[-1]
    pods = _pods(obj)
    assert len(pods) == (3 if kind == "FineTuneJob" else 2)
    for pod in pods:
        mounts = _mounts(pod)
        assert mounts["/opt/tuneserve/venv"] == {"name": "worker-venv", "hostPath": {"path": "/opt/tuneserve/venv"}, "readOnly": True}
        assert mounts["/scratch"] == {"name": "scratch", "hostPath": {"path": "/var/tmp/tuneserve"}, "readOnly": False}


def test_the_autoscaler_sidecar_mounts_the_host_volumes_too():
    catalog = load_catalog(LOCAL_CPU)
    serve = ModelServe.from_body({**load_example("modelserve-qwen-bank.yaml"),
                                  "metadata": {"name": "bank-llm", "namespace": "bank", "uid": "u2"}})
    rayservice = build_modelserve_children(serve, Candidate(catalog.get("cpu/cpu"), 1, 1, "t"), None, [], catalog)[-1]
    options = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert {m["mountPath"] for m in options["volumeMounts"]} == {"/opt/tuneserve/venv", "/scratch"}
    plain = build_modelserve_children(serve, Candidate(load_catalog().get("cpu/cpu"), 1, 1, "t"), None, [], load_catalog())[-1]
    assert "volumeMounts" not in plain["spec"]["rayClusterConfig"]["autoscalerOptions"]


def test_the_submitter_goes_where_the_head_goes():
    """The host directories exist only on the nodes the user's selector names: the submitter
    gets the head's node selector and tolerations (not the accelerator's)."""
    catalog = load_catalog(LOCAL_CPU)
    job = _job(nodeSelector={"tuneserve.dev/pool": "real-cpu"},
               tolerations=[{"key": "tuneserve.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}])
    rayjob = build_finetune_children(job, Candidate(catalog.get("cpu/cpu"), 1, 1, "t"), None, 1, catalog)[-1]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]
    assert submitter["nodeSelector"] == head["nodeSelector"] == {"tuneserve.dev/pool": "real-cpu"}
    assert submitter["tolerations"] == head["tolerations"] == [
        {"key": "tuneserve.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}]


def test_pod_volume_names_are_validated():
    with pytest.raises(ValueError):
        load_catalog({"vendors": {"cpu": {"podVolumes": [{"name": "Bad_Name", "hostPath": "/x", "mountPath": "/x"}]}}})
