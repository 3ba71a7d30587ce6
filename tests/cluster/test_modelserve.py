"""ModelServe on the real control plane: admission, the RayService per vendor, fallback, adapters
resolved from FineTuneJobs, adapter-list changes that leave the Ray cluster alone, and replica
bounds that reach the RayCluster KubeRay runs, without a new one."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kube import condition, wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from helpers import invalid_cases  # noqa: E402

pytestmark = pytest.mark.cluster
MS = ("tuneserve.dev/v1alpha1", "ModelServe")
RS = ("ray.io/v1", "RayService")
RC = ("ray.io/v1", "RayCluster")
CLUSTER_HASH = "ray.io/hash-without-replicas-and-workers-to-delete"   # KubeRay's; a new hash means a new cluster
EXAMPLES = REPO / "crds" / "examples"
CASES = invalid_cases(REPO / "tests" / "unit" / "data" / "invalid_modelserves.yaml")


def example(name: str) -> dict:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["metadata"].pop("namespace", None)
    return doc


def ms(kube, name, namespace) -> dict:
    return kube.get(*MS, name, namespace) or {}


def secrets(kube, namespace):
    kube.apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"token": "x"}},
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bank-s3"},
                 "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}}], namespace)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_invalid_modelserve_is_rejected_at_admission(kube, namespace, tuneserve_crds, case):
    if case.get("update"):
        kube.apply(copy.deepcopy(case["base"]), namespace)
    with pytest.raises(ApiException) as err:
        kube.apply(copy.deepcopy(case["manifest"]), namespace)
    assert err.value.status == 422, err.value.body
    assert case["expect"] in json.loads(err.value.body)["message"]


def test_bank_modelserve_serves_with_adapters_and_hot_adapter_changes_keep_the_cluster(kube, namespace, operator, cluster):
    secrets(kube, namespace)
    kube.apply(example("modelserve-qwen-bank.yaml"), namespace)

    def placed_and_rendered():
        obj = ms(kube, "bank-llm", namespace)
        rs = kube.get("ray.io/v1", "RayService", "bank-llm", namespace)
        return (obj, rs) if (obj.get("status") or {}).get("placement") and rs else None

    obj, rs = wait_for(placed_and_rendered, 60, "placement and the RayService")
    placement = obj["status"]["placement"]
    assert placement["vendor"] == "nvidia" and placement["product"] == "h100-80gb", placement
    assert obj["status"]["endpoint"].startswith(f"http://bank-llm-openai.{namespace}.svc")
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" in worker["containers"][0]["resources"]["limits"]

    # fin-v1's FineTuneJob does not exist: that adapter waits, the other one is desired.
    adapters_cm = wait_for(lambda: kube.get("v1", "ConfigMap", "bank-llm-adapters", namespace), 30, "adapters ConfigMap")
    desired = json.loads(next(iter(adapters_cm["data"].values())))
    assert [a["name"] for a in desired] == ["support-v3"]
    states = {a["name"]: a for a in wait_for(lambda: (ms(kube, "bank-llm", namespace).get("status") or {}).get("adapters"),
                                             30, "adapter states")}
    assert states["fin-v1"]["state"] in ("Pending", "Failed") and "fin-v1" in states["fin-v1"]["message"]

    # KubeRay starts the Ray cluster on the simulated fleet; the worker lands on an H100 node.
    def worker_pod():
        pods = kube.list("v1", "Pod", namespace, label_selector="ray.io/node-type=worker")
        return pods if pods and all(p["spec"].get("nodeName") for p in pods) else None

    pods = wait_for(worker_pod, 90, "the serve worker pod to be scheduled")
    node = kube.get("v1", "Node", pods[0]["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    rs_before = kube.get("ray.io/v1", "RayService", "bank-llm", namespace)
    pod_uids = {p["metadata"]["uid"] for p in kube.list("v1", "Pod", namespace, label_selector="ray.io/is-ray-node=yes")}

    # Add an adapter: only the adapters ConfigMap changes; RayService spec and pods stay.
    doc = example("modelserve-qwen-bank.yaml")
    doc["spec"]["adapters"].append({"name": "legal-v2", "uri": "s3://bank/adapters/legal-v2"})
    kube.apply(doc, namespace)
    wait_for(lambda: "legal-v2" in json.dumps(kube.get("v1", "ConfigMap", "bank-llm-adapters", namespace)["data"]),
             30, "legal-v2 in the adapters ConfigMap")
    rs_after = kube.get("ray.io/v1", "RayService", "bank-llm", namespace)
    assert rs_after["spec"] == rs_before["spec"], "an adapter change must not touch the RayService"
    assert rs_after["metadata"]["generation"] == rs_before["metadata"]["generation"]
    assert {p["metadata"]["uid"] for p in kube.list("v1", "Pod", namespace, label_selector="ray.io/is-ray-node=yes")} == pod_uids

    # Remove it again: gone from the desired set, still no change to the RayService.
    kube.apply(example("modelserve-qwen-bank.yaml"), namespace)
    wait_for(lambda: "legal-v2" not in json.dumps(kube.get("v1", "ConfigMap", "bank-llm-adapters", namespace)["data"]),
             30, "legal-v2 gone from the adapters ConfigMap")
    assert kube.get("ray.io/v1", "RayService", "bank-llm", namespace)["metadata"]["generation"] == rs_before["metadata"]["generation"]

    # A serve replica reports (as workers/tuneserve_workers/serve does): Ready, support-v3 Loaded.
    from datetime import datetime, timezone
    from tuneserve_workers.contract import ReplicaAdapterReport, ServeReplicaReport, replica_report_key
    report = ServeReplicaReport(replica_id="replica-a", state="Ready", updated_at=datetime.now(timezone.utc),
                                adapters={"support-v3": ReplicaAdapterReport(state="Loaded", uri="s3://bank/adapters/support-v3")})
    kube.core.patch_namespaced_config_map("bank-llm-serve-status", namespace,
                                          {"data": {replica_report_key("replica-a"): report.model_dump_json()}})
    obj = wait_for(lambda: (lambda o: o if (condition(o, "Ready") or {}).get("status") == "True" else None)(
        ms(kube, "bank-llm", namespace)), 60, "Ready once a replica reports")
    states = {a["name"]: a["state"] for a in obj["status"]["adapters"]}
    assert states["support-v3"] == "Loaded" and states["fin-v1"] == "Pending", states
    assert obj["status"]["replicas"]["ready"] == 1

    table = cluster.kubectl("get", "ms", "-n", namespace).stdout
    assert "READY" in table.splitlines()[0] and "ENDPOINT" in table.splitlines()[0], table
    assert "bank-llm-openai" in table


def test_preferred_accelerator_full_falls_back_for_serving(kube, namespace, operator):
    for i in range(2):
        kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"filler-{i}"},
                    "spec": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                             "containers": [{"name": "c", "image": "busybox",
                                             "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}, namespace)
    wait_for(lambda: sum(p["status"].get("phase") == "Running" for p in kube.list("v1", "Pod", namespace)) == 2,
             60, "filler pods")
    secrets(kube, namespace)
    kube.apply(example("modelserve-qwen-bank.yaml"), namespace)
    obj = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("placement") else None)(ms(kube, "bank-llm", namespace)),
                   60, "a placement")
    assert obj["status"]["placement"]["vendor"] == "amd", obj["status"]["placement"]
    assert any(r["choice"].startswith("nvidia/") and r["code"] == "Busy" for r in obj["status"]["rejectedChoices"])
    rs = wait_for(lambda: kube.get("ray.io/v1", "RayService", "bank-llm", namespace), 30, "the RayService")
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "amd.com/gpu" in worker["containers"][0]["resources"]["limits"]


def test_replicas_change_reaches_the_running_raycluster_without_a_new_cluster(kube, namespace, operator, cluster, monkeypatch):
    secrets(kube, namespace)
    kube.apply(example("modelserve-qwen-bank.yaml"), namespace)

    def active_cluster():
        rs = kube.get(*RS, "bank-llm", namespace) or {}
        name = ((rs.get("status") or {}).get("activeServiceStatus") or {}).get("rayClusterName")
        return name and kube.get(*RC, name, namespace)

    rc = wait_for(active_cluster, 120, "KubeRay's RayCluster, recorded as the RayService's active one")
    name, group = rc["metadata"]["name"], rc["spec"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (1, 4, 1)
    before = (rc["metadata"]["uid"], rc["metadata"]["annotations"][CLUSTER_HASH])

    doc = example("modelserve-qwen-bank.yaml")
    doc["spec"]["replicas"].update(min=2, max=6)
    kube.apply(doc, namespace)

    def bounds(want):
        def check():
            live = kube.get(*RC, name, namespace)
            g = live["spec"]["workerGroupSpecs"][0]
            return live if (g.get("minReplicas"), g.get("maxReplicas")) == want else None
        return check

    live = wait_for(bounds((2, 6)), 60, "the live RayCluster's worker group to get replicas 2..6")
    assert live["spec"]["workerGroupSpecs"][0]["replicas"] == 2, "replicas 1 is below the new min: clamped"
    events = wait_for(lambda: [e for e in kube.events_for(namespace, "bank-llm")
                               if e["involvedObject"]["kind"] == "ModelServe" and e["reason"] == "ReplicaBoundsUpdated"],
                      30, "the ReplicaBoundsUpdated Event on the ModelServe")
    assert f"RayCluster {name}" in events[0]["message"] and "1..4 -> 2..6" in events[0]["message"], events[0]

    # KubeRay has seen the new RayService spec and kept its cluster: same name, object and hash.
    rs = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
                           else None)(kube.get(*RS, "bank-llm", namespace)), 60, "KubeRay to observe the RayService change")
    rs_group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (rs_group["minReplicas"], rs_group["maxReplicas"]) == (2, 6)
    assert "max_replicas: 6" in rs["spec"]["serveConfigV2"] and "min_replicas: 2" in rs["spec"]["serveConfigV2"]
    assert rs["status"]["activeServiceStatus"]["rayClusterName"] == name
    assert not (rs["status"].get("pendingServiceStatus") or {}).get("rayClusterName"), rs["status"]
    assert [c["metadata"]["name"] for c in kube.list(*RC, namespace)] == [name]
    live = kube.get(*RC, name, namespace)
    assert (live["metadata"]["uid"], live["metadata"]["annotations"][CLUSTER_HASH]) == before

    # The running cluster follows its new minimum: KubeRay starts a second worker pod.
    wait_for(lambda: len(kube.list("v1", "Pod", namespace, label_selector=f"ray.io/cluster={name},ray.io/node-type=worker")) == 2,
             60, "a second worker pod for minReplicas 2")

    # And back down: max below the running replicas clamps them.
    doc["spec"]["replicas"].update(min=1, max=1)
    kube.apply(doc, namespace)
    live = wait_for(bounds((1, 1)), 60, "the live RayCluster's worker group to get replicas 1..1")
    assert live["spec"]["workerGroupSpecs"][0]["replicas"] == 1
    assert [c["metadata"]["name"] for c in kube.list(*RC, namespace)] == [name]

    # A patch planned from a stale copy of the cluster fails its test op and writes nothing (the
    # operator's own client, logged in from the kubeconfig as the operator process is).
    from tuneserve.controller.apiclient import ApiError, Client
    from tuneserve.controller.kubeapi import KubeApi
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    api = KubeApi(Client.from_environment(1))
    stale = [{"op": "test", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": 6},
             {"op": "replace", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": 9}]
    assert api.json_patch(*RC, name, namespace, stale) is False
    assert kube.get(*RC, name, namespace)["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 1
    # One the schema rejects is an error, not a stale read.
    with pytest.raises(ApiError) as err:
        api.json_patch(*RC, name, namespace, [{**stale[1], "value": "many"}])
    assert err.value.status == 422


def test_a_replica_whose_engine_died_is_a_failed_modelserve_with_the_cause_and_an_event(kube, namespace, operator, cluster):
    """A replica writes its last report (as workers/tuneserve_workers/serve does when vLLM's worker
    dies at start-up): the ModelServe says Failed and why, in its status, in `kubectl get` and in
    a Warning Event, instead of waiting on Ray Serve's retries."""
    from datetime import datetime, timezone
    from tuneserve_workers.contract import ServeReplicaReport, replica_report_key
    secrets(kube, namespace)
    kube.apply(example("modelserve-qwen-bank.yaml"), namespace)
    wait_for(lambda: kube.get("v1", "ConfigMap", "bank-llm-serve-status", namespace), 60, "the serve-status ConfigMap")
    cause = ("engine failed to start: VllmWorker-0 died: Fatal Python error: Illegal instruction (SIGILL) "
             "at vllm/v1/attention/backends/cpu_attn.py:411 in forward")
    report = ServeReplicaReport(replica_id="replica-a", state="Failed", message=cause, updated_at=datetime.now(timezone.utc))
    kube.core.patch_namespaced_config_map("bank-llm-serve-status", namespace,
                                          {"data": {replica_report_key("replica-a"): report.model_dump_json()}})

    def failed():
        obj = ms(kube, "bank-llm", namespace)
        return obj if (condition(obj, "Ready") or {}).get("reason") == "ReplicaFailed" else None
    obj = wait_for(failed, 60, "Ready=False with reason ReplicaFailed")
    assert obj["status"]["phase"] == "Failed"
    assert obj["status"]["message"] == f"replica replica-a failed: {cause}"
    events = wait_for(lambda: [e for e in kube.events_for(namespace, "bank-llm") if e["reason"] == "ReplicaFailed"],
                      30, "the ReplicaFailed Event")
    assert events[0]["type"] == "Warning" and "Illegal instruction (SIGILL)" in events[0]["message"]
    table = cluster.kubectl("get", "ms", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "PHASE", "READY"], table
    assert table[1].split()[:3] == ["bank-llm", "Failed", "0/1"], table
    wide = cluster.kubectl("get", "ms", "-n", namespace, "-o", "wide").stdout
    assert "Illegal instruction (SIGILL)" in wide, wide
