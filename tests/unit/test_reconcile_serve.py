"""The ModelServe reconcile plan without a cluster: a replicas change re-renders the RayService in
place and patches the bounds of the RayClusters KubeRay already runs for it."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from helpers import fleet, load_example, merge_patch

from tuneserve.core.catalog import load_catalog
from tuneserve.modelserve.reconcile import BOUNDS_UPDATED, ServeWorld, live_cluster_names, plan_modelserve

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()
ACTIVE, PENDING = "bank-llm-x7k2p", "bank-llm-q9w4m"
GROUP = "nvidia-h100-80gb"


def body(status=None, **spec_patch):
    doc = merge_patch(load_example("modelserve-qwen-bank.yaml"), {"spec": spec_patch})
    doc["metadata"].update(uid="uid-ms", generation=1)
    if status:
        doc["status"] = status
    return doc


def raycluster(name, low=1, high=4, replicas=1):
    return {"metadata": {"name": name, "namespace": "bank"},
            "spec": {"workerGroupSpecs": [{"groupName": GROUP, "replicas": replicas, "minReplicas": low, "maxReplicas": high}]}}


def world(children=None, ray_clusters=()):
    keys = {"hf-token": {"token"}, "bank-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}}
    return ServeWorld(nodes=fleet(), pods=[], serve_pods=[], children=children or {}, jobs={"fin-v1": None},
                      secrets={k: frozenset(v) for k, v in keys.items()}, ray_clusters={c["metadata"]["name"]: c for c in ray_clusters})


def running(plan, active=ACTIVE, pending=None):
    """The cluster after carrying out a plan, with KubeRay's status on the RayService."""
    children = {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in plan.apply}
    rs = children[("RayService", "bank-llm")]
    rs["status"] = {"activeServiceStatus": {"rayClusterName": active},
                    "pendingServiceStatus": {"rayClusterName": pending} if pending else {}}
    return children


def converged(pending=None):
    """A placed ModelServe (replicas 1..4) whose RayService runs on ACTIVE (and PENDING)."""
    first = plan_modelserve(body(), world(), CATALOG, NOW)
    assert first.patch == [], "no RayCluster yet"
    return first.status, running(first, pending=pending)


def test_nothing_to_patch_while_the_cluster_has_the_spec_bounds():
    status, children = converged()
    plan = plan_modelserve(body(status), world(children, [raycluster(ACTIVE)]), CATALOG, NOW + timedelta(seconds=5))
    assert plan.apply == [] and plan.patch == []


def test_replicas_change_patches_the_active_cluster_and_keeps_the_placement():
    status, children = converged()
    plan = plan_modelserve(body(status, replicas={"min": 2, "max": 6}), world(children, [raycluster(ACTIVE)]),
                           CATALOG, NOW + timedelta(seconds=5))
    # The RayService is re-rendered in place (same name, same rollout fingerprint: no new placement).
    (rs,) = [o for o in plan.apply if o["kind"] == "RayService"]
    group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 6)
    assert rs["metadata"]["annotations"]["tuneserve.dev/rollout-fingerprint"] == \
        children[("RayService", "bank-llm")]["metadata"]["annotations"]["tuneserve.dev/rollout-fingerprint"]
    assert plan.status is None or plan.status["placement"] == status["placement"]

    (patch,) = plan.patch
    assert (patch.api_version, patch.kind, patch.name) == ("ray.io/v1", "RayCluster", ACTIVE)
    changes = {p["path"].rsplit("/", 1)[1]: p["value"] for p in patch.ops if p["op"] != "test"}
    assert changes == {"minReplicas": 2, "maxReplicas": 6, "replicas": 2}, "replicas 1 < new min: clamped"
    assert patch.event.type == "Normal" and patch.event.reason == BOUNDS_UPDATED
    assert patch.event.message == f"RayCluster {ACTIVE}, worker group {GROUP}: replica bounds 1..4 -> 2..6, replicas 1 -> 2"
    assert not any(e.reason == BOUNDS_UPDATED for e in plan.events), "posted only once the patch applied"

    # The patched cluster, observed next time: nothing more to do.
    again = plan_modelserve(body(status, replicas={"min": 2, "max": 6}),
                            world(children, [raycluster(ACTIVE, 2, 6, 2)]), CATALOG, NOW + timedelta(seconds=10))
    assert again.patch == []


def test_replicas_within_the_new_bounds_stay_the_autoscalers():
    status, children = converged()
    plan = plan_modelserve(body(status, replicas={"min": 1, "max": 8}), world(children, [raycluster(ACTIVE, replicas=3)]),
                           CATALOG, NOW)
    (patch,) = plan.patch
    assert [p["path"] for p in patch.ops if p["op"] != "test"] == ["/spec/workerGroupSpecs/0/maxReplicas"]
    assert patch.event.message.endswith("1..4 -> 1..8")


def test_a_pending_cluster_of_an_upgrade_is_patched_too():
    status, children = converged(pending=PENDING)
    plan = plan_modelserve(body(status, replicas={"min": 1, "max": 2}),
                           world(children, [raycluster(ACTIVE), raycluster(PENDING, replicas=4)]), CATALOG, NOW)
    assert [p.name for p in plan.patch] == [ACTIVE, PENDING]
    assert plan.patch[1].event.message.endswith("1..4 -> 1..2, replicas 4 -> 2")


def test_no_patch_without_a_recorded_or_indexed_cluster():
    status, children = converged()
    changed = body(status, replicas={"min": 2, "max": 6})
    assert plan_modelserve(changed, world(children, []), CATALOG, NOW).patch == [], "not indexed (yet)"
    bare = copy.deepcopy(children)
    del bare[("RayService", "bank-llm")]["status"]
    assert plan_modelserve(changed, world(bare, [raycluster(ACTIVE)]), CATALOG, NOW).patch == [], "no status yet"
    other = plan_modelserve(changed, world(children, [raycluster("someone-else")]), CATALOG, NOW)
    assert other.patch == [], "only the clusters the RayService names"


def test_live_cluster_names():
    assert live_cluster_names(None) == []
    assert live_cluster_names({"status": {"activeServiceStatus": {}, "pendingServiceStatus": {"rayClusterName": "b"}}}) == ["b"]
    assert live_cluster_names({"status": {"activeServiceStatus": {"rayClusterName": "a"},
                                          "pendingServiceStatus": {"rayClusterName": "a"}}}) == ["a"]
