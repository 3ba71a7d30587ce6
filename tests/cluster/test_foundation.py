"""Acceptance tests of the local control plane itself: real apiserver, scheduler, KCM, kwok, KubeRay."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kube import condition, wait_for

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]

H100_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
NVIDIA_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _pod(name: str, resources: dict, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "busybox",
                                     "resources": {"limits": resources, "requests": resources}}],
                     **spec}}


def _node_labels(kube, node_name: str) -> dict:
    return kube.get("v1", "Node", node_name)["metadata"]["labels"]


def test_versions_are_the_pinned_release(cluster):
    """kubectl and the apiserver report the stamped, pinned release (not v0.0.0-master)."""
    pinned = dict(line.split("=", 1) for line in (REPO / "hack" / "versions.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == pinned["K8S_VERSION"]
    assert out["clientVersion"]["gitVersion"] == pinned["K8S_VERSION"]


def test_fleet_has_every_vendor_with_labels_and_taints(kube):
    nodes = kube.list("v1", "Node")
    capacity = {}
    for n in nodes:
        for res, qty in n["status"]["capacity"].items():
            if "/" in res:
                capacity[res] = capacity.get(res, 0) + int(qty)
    assert capacity["nvidia.com/gpu"] >= 16 + 2 + 4
    assert capacity["amd.com/gpu"] >= 8
    assert capacity["huawei.com/Ascend910"] >= 8
    assert capacity["habana.ai/gaudi"] >= 8
    h100 = [n for n in nodes if n["metadata"]["labels"].get("nvidia.com/gpu.product") == "NVIDIA-H100-80GB-HBM3"]
    assert h100 and all(n["status"]["capacity"]["nvidia.com/gpu"] == "8" for n in h100)
    assert all({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
               for n in h100)
    cpu_only = [n for n in nodes if n["metadata"]["labels"].get("tuneserve.dev/pool") == "cpu"]
    assert cpu_only and all(not n["spec"].get("taints") for n in cpu_only)


def test_raycluster_with_h100_workers_is_ready_on_h100_nodes_only(kube, namespace):
    pod_spec = {"nodeSelector": H100_SELECTOR, "tolerations": [NVIDIA_TOLERATION]}
    rc = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "h100"},
        "spec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {**pod_spec, "containers": [{
                "name": "ray-head", "image": "rayproject/ray:2.60.0",
                "resources": {"limits": {"cpu": "2", "memory": "8Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}}}]}}},
            "workerGroupSpecs": [{
                "groupName": "h100", "replicas": 2, "minReplicas": 2, "maxReplicas": 2, "rayStartParams": {},
                "template": {"spec": {**pod_spec, "containers": [{
                    "name": "ray-worker", "image": "rayproject/ray:2.60.0-gpu",
                    "resources": {"limits": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"},
                                  "requests": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"}}}]}}}],
        },
    }
    kube.apply(rc, namespace)
    ready = wait_for(lambda: (kube.get("ray.io/v1", "RayCluster", "h100", namespace) or {})
                     .get("status", {}).get("state") == "ready", 90, "RayCluster h100 to be ready")
    assert ready
    pods = kube.list("v1", "Pod", namespace, label_selector="ray.io/cluster=h100")
    assert len(pods) == 3
    for p in pods:
        labels = _node_labels(kube, p["spec"]["nodeName"])
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3", p["spec"]["nodeName"]
    workers = [p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "worker"]
    # 8 GPUs each: the two workers cannot share a node.
    assert len({p["spec"]["nodeName"] for p in workers}) == 2
    # KubeRay turned the extended resource into Ray's GPU count.
    assert any("--num-gpus=8" in " ".join(c.get("args", []) + c.get("command", []))
               for p in workers for c in p["spec"]["containers"])


def test_amd_pod_lands_on_mi300x_and_oversized_pod_stays_pending_with_reason(kube, namespace):
    kube.apply(_pod("amd", {"amd.com/gpu": "1"},
                    tolerations=[{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
               namespace)
    kube.apply(_pod("too-big", {"nvidia.com/gpu": "16"}, tolerations=[NVIDIA_TOLERATION]), namespace)

    amd = wait_for(lambda: (lambda p: p if p and p["status"].get("phase") == "Running" else None)(
        kube.get("v1", "Pod", "amd", namespace)), 60, "the AMD pod to run")
    assert _node_labels(kube, amd["spec"]["nodeName"])["amd.com/gpu.product-name"] == "AMD-Instinct-MI300X"

    def unschedulable():
        pod = kube.get("v1", "Pod", "too-big", namespace)
        cond = condition(pod, "PodScheduled")
        return cond if cond and cond.get("reason") == "Unschedulable" else None

    cond = wait_for(unschedulable, 60, "the scheduler to give up on the 16-GPU pod")
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]
    assert kube.get("v1", "Pod", "too-big", namespace)["status"]["phase"] == "Pending"
    events = kube.events_for(namespace, "too-big")
    assert any(e["reason"] == "FailedScheduling" and "nvidia.com/gpu" in e["message"] for e in events)


def test_deleting_an_owner_garbage_collects_its_children(kube, namespace):
    owner = kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, namespace)[0]
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "child", "ownerReferences": [ref]}}, namespace)
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}},
               namespace)
    wait_for(lambda: len([p for p in kube.list("v1", "Pod", namespace, label_selector="app=web")
                          if p["status"].get("phase") == "Running"]) == 2, 60, "2 web pods running")

    kube.delete("v1", "ConfigMap", "owner", namespace)
    kube.delete("apps/v1", "Deployment", "web", namespace)
    wait_for(lambda: kube.get("v1", "ConfigMap", "child", namespace) is None, 60, "the child ConfigMap to go")
    wait_for(lambda: not kube.list("apps/v1", "ReplicaSet", namespace), 60, "the ReplicaSet to go")
    wait_for(lambda: not kube.list("v1", "Pod", namespace, label_selector="app=web"), 60, "the pods to go")


def _rayjob(name: str) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name},
        "spec": {
            "entrypoint": "python -c 'print(42)'", "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{
                    "name": "ray-head", "image": "rayproject/ray:2.60.0",
                    "resources": {"limits": {"cpu": "1", "memory": "2Gi"}, "requests": {"cpu": "1", "memory": "2Gi"}}}]}}},
                "workerGroupSpecs": [{"groupName": "cpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                                      "rayStartParams": {}, "template": {"spec": {"containers": [{
                                          "name": "ray-worker", "image": "rayproject/ray:2.60.0",
                                          "resources": {"limits": {"cpu": "1", "memory": "2Gi"},
                                                        "requests": {"cpu": "1", "memory": "2Gi"}}}]}}}],
            },
        },
    }


@pytest.mark.parametrize("outcome, deployment_status", [("SUCCEEDED", "Complete"), ("FAILED", "Failed")])
def test_rayjob_reaches_terminal_state_driven_by_the_dashboard_stand_in(kube, namespace, dashboard,
                                                                      outcome, deployment_status):
    kube.apply(_rayjob("job"), namespace)

    def running():
        st = (kube.get("ray.io/v1", "RayJob", "job", namespace) or {}).get("status") or {}
        return st if st.get("jobDeploymentStatus") == "Running" and st.get("jobId") else None

    status = wait_for(running, 120, "the RayJob to be Running with a job id")
    job_id = status["jobId"]
    # KubeRay is really asking the (stand-in) dashboard about this job.
    wait_for(lambda: job_id in dashboard.jobs()["asked"], 30, "KubeRay to ask the dashboard")
    submitter = kube.get("batch/v1", "Job", "job", namespace)
    assert submitter is not None, "K8sJobMode creates a submitter Job"

    dashboard.set_job(job_id, outcome, message=f"driven by the test: {outcome}")

    def terminal():
        st = kube.get("ray.io/v1", "RayJob", "job", namespace)["status"]
        return st if st.get("jobDeploymentStatus") in ("Complete", "Failed") else None

    status = wait_for(terminal, 120, f"the RayJob to become {deployment_status}")
    assert status["jobDeploymentStatus"] == deployment_status
    assert status["jobStatus"] == outcome
    # shutdownAfterJobFinishes: KubeRay deletes the RayCluster it created.
    wait_for(lambda: not kube.list("ray.io/v1", "RayCluster", namespace), 90, "the RayCluster to be deleted")


def test_job_pods_complete_and_the_job_controller_marks_the_job_complete(kube, namespace):
    kube.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
                "spec": {"completions": 2, "parallelism": 2, "template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}, namespace)
    job = wait_for(lambda: (lambda j: j if condition(j, "Complete") and condition(j, "Complete")["status"] == "True" else None)(
        kube.get("batch/v1", "Job", "once", namespace)), 60, "the Job to complete")
    assert job["status"]["succeeded"] == 2
