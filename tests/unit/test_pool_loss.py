"""A pool lost at run time (issue 15) in the planner: the job trained on choice 1, its node stopped
matching choice 1 and its pods were lost; what KubeRay does next (the RayJob still Running, retried
after the driver failed, or initializing a new cluster) leaves the worker pod unschedulable, and
after fallbackAfterMinutes the job moves to choice 2, resuming from the same checkpoints
(tests/cluster/test_real_pool_loss.py does this on the real node)."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest

from helpers import node

from tuneserve.core.catalog import load_catalog
from tuneserve.finetunejob.reconcile import World, plan_finetunejob
from tuneserve_workers.contract import PROGRESS_KEY, CheckpointRef, Progress

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)
POOL_A, POOL_B = "example.com/cpu-a", "example.com/cpu-b"
CATALOG = load_catalog({"vendors": {"cpu": {"products": {
    "cpu": {"nodeLabels": {POOL_A: "true"}},
    "cpu-b": {"displayName": "CPU (pool B)", "nodeLabels": {POOL_B: "true"}, "memoryGiB": 4, "memoryScope": "worker",
              "bf16Tflops": 0.5, "pricePerDeviceHour": 0.04}}}}})
CHECKPOINTS = "s3://story/checkpoints/lossy"


def body() -> dict:
    return {"apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "lossy", "namespace": "ml", "uid": "uid-1", "generation": 1},
            "spec": {"baseModel": {"uri": "s3://story/models/tiny", "sizeHints": {
                         "parametersBillions": 0.001, "layers": 2, "hiddenSize": 128, "vocabSize": 4000}},
                     "dataset": {"uri": "s3://story/data/chat.jsonl"}, "output": {"uri": "s3://story/adapters/lossy"},
                     "training": {"maxSteps": 120, "precision": "fp32"},
                     "checkpoint": {"uri": CHECKPOINTS, "intervalSteps": 40},
                     "accelerators": {"fallbackAfterMinutes": 1, "choices": [
                         {"vendor": "cpu", "product": "cpu", "devicesPerWorker": 1, "workers": 1},
                         {"vendor": "cpu", "devicesPerWorker": 1, "workers": 1}]}}}


def the_node(*labels: str) -> dict:
    return node("real-cpu-0", "real-cpu", "local", {k: "true" for k in labels}, cpu="2", memory="16Gi")


def pod(role: str, attempt: int, bound: bool, since: datetime) -> dict:
    """A Ray pod of the job: bound and Running, or Pending and refused by the scheduler since ``since``."""
    scheduled = {"type": "PodScheduled", "status": "True" if bound else "False", "lastTransitionTime": since.isoformat(),
                 **({} if bound else {"reason": "Unschedulable"})}
    return {"metadata": {"labels": {"tuneserve.dev/finetunejob": "lossy", "tuneserve.dev/attempt": str(attempt),
                                    "ray.io/node-type": role}},
            "spec": {"nodeName": "real-cpu-0"} if bound else {},
            "status": {"phase": "Running" if bound else "Pending", "conditions": [scheduled]}}


def progress(state: str, step: int) -> dict:
    doc = Progress(state=state, step=step, total_steps=120, last_checkpoint=CheckpointRef(
        uri=f"{CHECKPOINTS}/step-000000040", step=40, time=NOW), updated_at=NOW)
    return {"data": {PROGRESS_KEY: doc.model_dump_json()}}


def world(node_: dict, job_pods: list, ray_jobs: dict, progress_cm=None) -> World:
    return World(nodes=[node_], pods=[p for p in job_pods if p["spec"].get("nodeName")], job_pods=job_pods,
                 ray_jobs=ray_jobs, children={}, progress_configmap=progress_cm, secrets={})


def trained_on_choice_1() -> tuple[dict, dict]:
    """The job placed on choice 1 and Running at step 50 (checkpoint 40): its body and RayJob."""
    first = plan_finetunejob(body(), world(the_node(POOL_A, POOL_B), [], {}), CATALOG, NOW)
    assert first.status["placement"]["choice"] == "cpu/cpu 1x1"
    ray_job = {**next(o for o in first.apply if o["kind"] == "RayJob"),
               "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    b = body()
    b["status"] = first.status
    pods = [pod("head", 1, True, NOW), pod("worker", 1, True, NOW)]
    running = plan_finetunejob(copy.deepcopy(b), world(the_node(POOL_A, POOL_B), pods, {"lossy-1": ray_job},
                                                       progress("Running", 50)), CATALOG, NOW + timedelta(minutes=2))
    assert running.status["phase"] == "Running", running.status
    b["status"] = running.status
    return b, ray_job


# What KubeRay shows once the pods are lost: the RayJob not yet aware; retried after the driver
# failed (the worker reported Failed); a new cluster initializing after the retry.
AFTER_LOSS = {
    "still running": ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running"),
    "retrying": ({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1}, "Failed"),
    "new cluster": ({"jobDeploymentStatus": "Initializing", "failed": 1}, "Failed"),
}


@pytest.mark.parametrize("kuberay", sorted(AFTER_LOSS))
def test_a_lost_pool_moves_to_the_next_choice_after_the_timeout(kuberay):
    b, ray_job = trained_on_choice_1()
    rj_status, reported = AFTER_LOSS[kuberay]
    lost_at = NOW + timedelta(minutes=3)
    pods = [pod("head", 1, True, lost_at), pod("worker", 1, False, lost_at)]
    lost = world(the_node(POOL_B), pods, {"lossy-1": {**ray_job, "status": rj_status}}, progress(reported, 50))
    early = plan_finetunejob(copy.deepcopy(b), lost, CATALOG, lost_at + timedelta(seconds=30))
    assert early.delete == [] and 29 <= early.requeue_after <= 31
    assert (early.status or b["status"])["phase"] != "Failed", early.status
    late = plan_finetunejob(copy.deepcopy(b), lost, CATALOG, lost_at + timedelta(seconds=61))
    status = late.status
    assert status["phase"] not in ("Failed", "Succeeded"), status
    assert status["placement"]["attempt"] == 2 and status["placement"]["choice"] == "cpu/cpu-b 1x1"
    assert [(r["choice"], r["code"]) for r in status["rejectedChoices"] if r["code"] == "TimedOut"] == \
        [("cpu/cpu 1x1", "TimedOut")]
    assert "1 earlier choice rejected" in status["placement"]["reason"], "choice 2 tries cpu/cpu no second time"
    assert any(e.reason == "FellBack" for e in late.events)
    assert late.delete == [("ray.io/v1", "RayJob", "lossy-1")]
    new = next(o for o in late.apply if o["kind"] == "RayJob")
    worker = new["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert new["metadata"]["name"] == "lossy-2" and worker["nodeSelector"].get(POOL_B) == "true" \
        and POOL_A not in worker["nodeSelector"]
    config = next(o for o in late.apply if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lossy-2-config")
    assert CHECKPOINTS in str(config["data"]), "the next choice resumes from the same checkpoints"


def lost_with_a_failed_run(b: dict, ray_job: dict, worker_bound: bool) -> World:
    """KubeRay gave up on attempt 1 (backoffLimit used up): its Ray job failed, its replaced worker
    pod still pending (unschedulable: the pool is gone) or, for a training failure, bound."""
    lost_at = NOW + timedelta(minutes=3)
    failed = {**ray_job, "status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 1}}
    pods = [pod("head", 1, True, lost_at), pod("worker", 1, worker_bound, lost_at)]
    return world(the_node(POOL_B) if not worker_bound else the_node(POOL_A, POOL_B), pods, {"lossy-1": failed},
                 progress("Failed", 50))


def test_a_run_failed_by_a_lost_pool_moves_to_the_next_choice_at_once():
    """No retry left: KubeRay deletes the failed run's cluster (and the pending pods that show the
    pool is gone) 30 s later, so the job moves on now instead of failing."""
    b, ray_job = trained_on_choice_1()
    plan = plan_finetunejob(copy.deepcopy(b), lost_with_a_failed_run(b, ray_job, worker_bound=False), CATALOG,
                            NOW + timedelta(minutes=3, seconds=5))
    status = plan.status
    assert status["phase"] not in ("Failed", "Succeeded"), status
    assert status["placement"]["attempt"] == 2 and status["placement"]["choice"] == "cpu/cpu-b 1x1"
    timed_out = [r for r in status["rejectedChoices"] if r["code"] == "TimedOut"]
    assert [r["choice"] for r in timed_out] == ["cpu/cpu 1x1"] and "run failed while its worker pods" in timed_out[0]["message"]
    assert plan.delete == [("ray.io/v1", "RayJob", "lossy-1")]
    assert any(o["kind"] == "RayJob" and o["metadata"]["name"] == "lossy-2" for o in plan.apply)


def test_a_run_that_failed_on_bound_workers_fails_the_job():
    """A training failure (its workers were running) is the job's: no fallback."""
    b, ray_job = trained_on_choice_1()
    plan = plan_finetunejob(copy.deepcopy(b), lost_with_a_failed_run(b, ray_job, worker_bound=True), CATALOG,
                            NOW + timedelta(minutes=3, seconds=5))
    assert plan.status["phase"] == "Failed" and plan.status["placement"]["attempt"] == 1, plan.status


def test_a_run_failed_by_a_lost_pool_with_no_choice_left_fails_the_job():
    b, ray_job = trained_on_choice_1()
    b["spec"]["accelerators"]["choices"] = b["spec"]["accelerators"]["choices"][:1]
    plan = plan_finetunejob(copy.deepcopy(b), lost_with_a_failed_run(b, ray_job, worker_bound=False), CATALOG,
                            NOW + timedelta(minutes=3, seconds=5))
    assert plan.status["phase"] == "Failed", plan.status
    assert [r["code"] for r in plan.status["rejectedChoices"]] == ["TimedOut"]
    assert plan.delete == [("ray.io/v1", "RayJob", "lossy-1")] and not any(o["kind"] == "RayJob" for o in plan.apply)
