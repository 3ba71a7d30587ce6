"""The reconcile plan (what the operator writes) without a cluster: idempotence, secrets, fallback."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

from helpers import fleet, load_example

from tuneserve.core.catalog import load_catalog
from tuneserve.finetunejob.reconcile import World, plan_finetunejob

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()


def body(name="fin-v1"):
    doc = load_example("finetunejob-qwen-bank.yaml")
    doc["metadata"].update(name=name, namespace="bank", uid="uid-1", generation=1)
    return doc


def world(children=None, ray_jobs=None, job_pods=(), secrets=("hf-token", "bank-s3"), progress=None):
    keys = {"hf-token": {"token"}, "bank-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}}
    return World(nodes=fleet(), pods=[], job_pods=list(job_pods), ray_jobs=ray_jobs or {},
                 children=children or {}, progress_configmap=progress,
                 secrets={name: frozenset(keys[name]) for name in secrets})


def unschedulable_pod(since, attempt=1):
    """A worker pod of fin-v1's attempt that the scheduler has refused since ``since``."""
    return {"metadata": {"labels": {"tuneserve.dev/finetunejob": "fin-v1", "tuneserve.dev/attempt": str(attempt)}},
            "spec": {}, "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "lastTransitionTime": since.isoformat()}]}}


def live(plan):
    """The cluster after carrying out a plan: what the next reconcile observes."""
    return {(o["kind"], o["metadata"]["name"]): o for o in plan.apply}


def test_first_reconcile_places_applies_children_and_writes_status():
    plan = plan_finetunejob(body(), world(), CATALOG, NOW)
    kinds = [o["kind"] for o in plan.apply]
    assert kinds[-1] == "RayJob" and "ConfigMap" in kinds and "Role" in kinds
    assert plan.status["placement"]["vendor"] == "nvidia"
    assert plan.status["phase"] == "Pending"
    assert any(e.reason == "FitsNow" for e in plan.events)


def test_once_converged_a_reconcile_with_nothing_changed_writes_nothing():
    first = plan_finetunejob(body(), world(), CATALOG, NOW)
    children = live(first)
    ray_jobs = {k[1]: v for k, v in children.items() if k[0] == "RayJob"}
    b = body()
    b["status"] = first.status
    second = plan_finetunejob(b, world(children=children, ray_jobs=ray_jobs), CATALOG, NOW + timedelta(seconds=5))
    assert second.apply == [] and second.delete == []
    assert second.status["phase"] == "Starting", "the RayJob now exists"
    b["status"] = second.status
    third = plan_finetunejob(b, world(children=children, ray_jobs=ray_jobs), CATALOG, NOW + timedelta(seconds=10))
    assert third.apply == [] and third.delete == []
    assert third.status is None, "no status write when nothing changed"
    assert third.events == []


def test_missing_secret_blocks_without_failing():
    plan = plan_finetunejob(body(), world(secrets=("bank-s3",)), CATALOG, NOW)
    assert plan.apply == []
    assert plan.status["phase"] == "Pending"
    accepted = next(c for c in plan.status["conditions"] if c["type"] == "Accepted")
    assert accepted["reason"] == "SecretNotFound" and "hf-token" in accepted["message"]
    assert "hf_" not in json.dumps(plan.status)


def test_pods_unschedulable_past_the_timeout_move_to_the_next_choice():
    first = plan_finetunejob(body(), world(), CATALOG, NOW)
    b = body()
    b["status"] = first.status
    children = live(first)
    ray_jobs = {k[1]: v for k, v in children.items() if k[0] == "RayJob"}
    since = NOW + timedelta(seconds=10)
    stuck = unschedulable_pod(since)
    early = plan_finetunejob(copy.deepcopy(b), world(children=children, ray_jobs=ray_jobs, job_pods=[stuck]),
                             CATALOG, since + timedelta(minutes=1))
    assert early.delete == [] and early.requeue_after > 0
    late = plan_finetunejob(copy.deepcopy(b), world(children=children, ray_jobs=ray_jobs, job_pods=[stuck]),
                            CATALOG, since + timedelta(minutes=16))
    assert late.status["placement"]["attempt"] == 2
    assert late.status["placement"]["vendor"] == "amd"
    assert ("ray.io/v1", "RayJob", "fin-v1-1") in late.delete
    assert any(o["kind"] == "RayJob" and o["metadata"]["name"] == "fin-v1-2" for o in late.apply)
    timed_out = [r for r in late.status["rejectedChoices"] if r["code"] == "TimedOut"]
    assert timed_out and "unschedulable for" in timed_out[0]["message"]


def test_terminal_jobs_are_left_alone():
    b = body()
    b["status"] = {"phase": "Succeeded"}
    plan = plan_finetunejob(b, world(), CATALOG, NOW)
    assert plan.apply == [] and plan.status is None


def test_the_last_choice_timing_out_fails_the_job_and_deletes_its_stuck_rayjob():
    """Otherwise the unschedulable pods of a Failed job would start training once capacity frees."""
    b = body()
    b["spec"]["accelerators"]["choices"] = b["spec"]["accelerators"]["choices"][:1]
    first = plan_finetunejob(copy.deepcopy(b), world(), CATALOG, NOW)
    b["status"] = first.status
    children = live(first)
    ray_jobs = {k[1]: v for k, v in children.items() if k[0] == "RayJob"}
    stuck = unschedulable_pod(NOW)
    late = plan_finetunejob(copy.deepcopy(b), world(children=children, ray_jobs=ray_jobs, job_pods=[stuck]),
                            CATALOG, NOW + timedelta(minutes=16))
    assert late.status["phase"] == "Failed", late.status
    assert late.delete == [("ray.io/v1", "RayJob", "fin-v1-1")] and late.apply == []


def test_a_finished_job_keeps_its_own_rayjob_and_loses_only_those_it_moved_past():
    """A crash between the terminal status write and the delete: the next plan deletes it."""
    b = body()
    ray_jobs = {"fin-v1-1": {}, "fin-v1-2": {}}
    b["status"] = {"phase": "Failed"}                                   # no placement left
    assert plan_finetunejob(copy.deepcopy(b), world(ray_jobs=ray_jobs), CATALOG, NOW).delete == [
        ("ray.io/v1", "RayJob", "fin-v1-1"), ("ray.io/v1", "RayJob", "fin-v1-2")]
    done = plan_finetunejob(body(), world(), CATALOG, NOW).status
    b["status"] = {**done, "phase": "Succeeded", "placement": {**done["placement"], "attempt": 2}}
    plan = plan_finetunejob(copy.deepcopy(b), world(ray_jobs=ray_jobs), CATALOG, NOW)
    assert plan.delete == [("ray.io/v1", "RayJob", "fin-v1-1")] and plan.apply == [] and plan.status is None
