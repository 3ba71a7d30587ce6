"""A pool lost at run time (issue 15): one FineTuneJob of the story (hack/realstory.py) with two
accelerator choices that both run on the real node, told apart by a node label the real node
carries for each (the catalog given to the Helm-installed operator: product cpu/cpu needs
``POOL_A``, product cpu/cpu-b needs ``POOL_B``).

The job trains on choice 1 past a checkpoint; then its pool goes as a lost node's would: the real
node stops carrying ``POOL_A``, every process of the job's pods is SIGKILLed (no preStop, no
emergency checkpoint) and the pods are force-deleted. KubeRay starts pods in their place; the
worker's are unschedulable now, and after ``fallbackAfterMinutes`` (1) the operator moves on to
choice 2: placement attempt 2, choice 1 in rejectedChoices as TimedOut, a FellBack Event. The new
attempt's RayJob runs on the real node through ``POOL_B``, resumes from the newest checkpoint of
attempt 1 and the job ends Succeeded. Steps lost = the step reported just before the loss - the
step the resumed run started from (``resumed_from_step``): at most one checkpoint interval.
"""
from __future__ import annotations

import copy
import json
import re
import time
from datetime import datetime
from typing import Optional

import pytest
from kubernetes.client.exceptions import ApiException

import realstory as story
from realjob import Timeline, between_checkpoints, committed
from realnode import RealNodeError

pytestmark = pytest.mark.cluster
NS, FTJ = "real-pool-loss", "poolloss"
# ~0.5 s a step of 16 samples on the real node: an interval of 40 steps is ~20 s, so reports (every
# 10 s) fall between two checkpoints and the loss hits after the first one.
STEPS, INTERVAL, BATCH, FALLBACK_MINUTES = 120, 40, 16, 1
POOL_A, POOL_B = "tuneserve.dev/test-cpu-a", "tuneserve.dev/test-cpu-b"
CHOICE_1, CHOICE_2 = "cpu/cpu 1x1", "cpu/cpu-b 1x1"
JOB_PODS = f"tuneserve.dev/finetunejob={FTJ}"


@pytest.fixture(scope="module")
def operator_values(operator_values) -> dict:
    """The story's chart values with two CPU products, one per pool label."""
    values = copy.deepcopy(operator_values)
    values["catalog"]["vendors"]["cpu"]["products"] = {
        "cpu": {"nodeLabels": {POOL_A: "true"}},
        "cpu-b": {"displayName": "CPU (pool B)", "nodeLabels": {POOL_B: "true"}, "memoryGiB": 4,
                  "memoryScope": "worker", "bf16Tflops": 0.5, "mfu": 0.3, "pricePerDeviceHour": 0.04},
    }
    return values


def _label_node(kube, node: str, labels: dict) -> None:
    kube.core.patch_node(node, {"metadata": {"labels": labels}})


@pytest.fixture(scope="module")
def pools(kube, cluster) -> str:
    """The real node in both pools; neither label left on it after the module."""
    node = cluster.real_node.node_name
    _label_node(kube, node, {POOL_A: "true", POOL_B: "true"})
    try:
        yield node
    finally:
        _label_node(kube, node, {POOL_A: None, POOL_B: None})


@pytest.fixture(scope="module")
def timeline(kube, helm_operator, storage, story_namespace, pools) -> Timeline:
    """The job, created with choice 1 (cpu/cpu) then choice 2 (any other CPU product); printed at the end."""
    _, where = storage
    choices = [{"vendor": "cpu", "product": "cpu", "devicesPerWorker": 1, "workers": 1},
               {"vendor": "cpu", "devicesPerWorker": 1, "workers": 1}]
    kube.apply(story.build_finetunejob(FTJ, NS, where, training={"maxSteps": STEPS, "globalBatchSize": BATCH},
                                       checkpoint_interval=INTERVAL,
                                       accelerators={"choices": choices, "fallbackAfterMinutes": FALLBACK_MINUTES}))
    t = Timeline(kube, NS, FTJ)
    yield t
    print(t.text())


def _kill_and_force_delete(kube, cluster, pods: list[dict]) -> None:
    """As a lost node: every running container's processes SIGKILLed, then the pods force-deleted."""
    for pod in pods:
        for c in pod["status"].get("containerStatuses") or []:
            if (c.get("state") or {}).get("running") and c.get("containerID"):
                try:
                    cluster.real_node.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", c["containerID"].split("://", 1)[1])
                except RealNodeError:
                    pass   # it exited meanwhile
    for pod in pods:
        try:
            kube.core.delete_namespaced_pod(pod["metadata"]["name"], NS, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _pods_seen(timeline: Timeline, seen: set) -> None:
    """Notes each of the job's pods once per (attempt, role, phase, reason it is not scheduled)."""
    for pod in timeline.kube.list("v1", "Pod", NS, label_selector=JOB_PODS):
        labels = pod["metadata"]["labels"]
        sched = next((c for c in pod["status"].get("conditions") or [] if c["type"] == "PodScheduled"), {})
        key = (labels.get("tuneserve.dev/attempt"), labels.get("ray.io/node-type", "submitter"),
               pod["status"].get("phase"), sched.get("reason"))
        if key not in seen:
            seen.add(key)
            timeline.note("pod of attempt {} ({}) {} {}".format(*key) + (f": {sched.get('message')}" if sched.get("reason") else ""))


@pytest.fixture(scope="module")
def lost(kube, cluster, storage, timeline, pools) -> dict:
    """Choice 1 trained past a checkpoint; its pool lost; the operator moved on (or gave up)."""
    before = timeline.wait(lambda: (p := timeline.progress()) and between_checkpoints(p, None, STEPS, INTERVAL) and p,
                           600, "the first run to report a step between two checkpoints")
    placed = timeline.ftj()["status"]["placement"]
    _label_node(kube, pools, {POOL_A: None})
    _kill_and_force_delete(kube, cluster, kube.list("v1", "Pod", NS, label_selector=JOB_PODS))
    lost_at = time.monotonic()
    timeline.note(f"pool of choice 1 lost ({POOL_A} removed, the job's pods killed) at reported step {before.step}")
    newest = max(committed(storage, FTJ).items(), default=(None, {}))
    seen: set = set()

    def moved_on() -> Optional[dict]:
        _pods_seen(timeline, seen)
        timeline.progress()
        status = timeline.ftj().get("status") or {}
        done = (status.get("placement") or {}).get("attempt", 1) > 1 or status.get("phase") == "Failed"
        return status if done else None
    status = timeline.wait(moved_on, 60 * FALLBACK_MINUTES + 240, "the operator to move on from the lost pool")
    fell_back_s = time.monotonic() - lost_at
    timeline.note(f"attempt {(status.get('placement') or {}).get('attempt')} placed {fell_back_s:.0f}s after the loss")
    after = timeline.resumed(0) if status.get("phase") != "Failed" else None
    _pods_seen(timeline, seen)
    return {"before": before, "placed": placed, "newest_at_loss": newest, "status": status, "fell_back_s": fell_back_s,
            "after": after, "seen": seen}


def test_the_lost_pool_times_out_and_the_job_moves_to_the_next_choice(kube, lost):
    placed, status = lost["placed"], lost["status"]
    assert placed["attempt"] == 1 and placed["choice"] == CHOICE_1
    assert status.get("phase") != "Failed", json.dumps(status, indent=1)
    placement = status["placement"]
    assert placement["attempt"] == 2 and placement["choice"] == CHOICE_2, json.dumps(placement, indent=1)
    timed_out = [r for r in status["rejectedChoices"] if r["code"] == "TimedOut"]
    assert [r["choice"] for r in timed_out] == [CHOICE_1] and "unschedulable" in timed_out[0]["message"]
    assert any(k[0] == "1" and k[1] == "worker" and k[3] == "Unschedulable" for k in lost["seen"]), \
        "the worker pod of attempt 1 was unschedulable once its pool was gone"
    since = datetime.fromisoformat(re.search(r"since (\S+), timeout", timed_out[0]["message"]).group(1))
    waited = (datetime.fromisoformat(timed_out[0]["at"].replace("Z", "+00:00")) - since).total_seconds()
    print(f"\nmoved to choice 2 {lost['fell_back_s']:.0f}s after the loss, {waited:.0f}s after the worker pod it "
          f"timed out on was unschedulable (fallbackAfterMinutes {FALLBACK_MINUTES})")
    assert lost["fell_back_s"] >= 60 * FALLBACK_MINUTES - 2, "moved on before the fallback timeout"
    assert 60 * FALLBACK_MINUTES <= waited <= 60 * FALLBACK_MINUTES + 30, "moved on at the fallback timeout"
    reasons = [e.get("reason") for e in kube.events_for(NS, FTJ)]
    assert "FellBack" in reasons, reasons
    assert kube.get("ray.io/v1", "RayJob", f"{FTJ}-1", NS) is None, "the lost attempt's RayJob is deleted"


def test_the_next_choice_resumes_from_the_lost_attempt_s_checkpoint(kube, pools, lost):
    before, after = lost["before"], lost["after"]
    assert after is not None, "no run resumed"
    step_lost = before.step - after.resumed_from_step
    print(f"\npool lost after reporting step {before.step} (last checkpoint {before.last_checkpoint.step}); "
          f"choice 2 resumed from step {after.resumed_from_step}: {step_lost} steps lost (interval {INTERVAL})")
    newest, marker = lost["newest_at_loss"]
    assert after.resumed_from_step == newest and not marker["meta"].get("drained"), \
        "a lost node commits no emergency checkpoint: the next choice resumes from the last periodic one"
    assert 0 <= step_lost <= INTERVAL
    workers = [p for p in kube.list("v1", "Pod", NS, label_selector=f"{JOB_PODS},ray.io/node-type=worker")
               if p["metadata"]["labels"].get("tuneserve.dev/attempt") == "2"]
    assert workers and all(p["spec"]["nodeName"] == pools and p["spec"]["nodeSelector"].get(POOL_B) == "true"
                           for p in workers), "attempt 2 trains on the real node through pool B"


def test_the_job_succeeds_on_the_next_choice(timeline, lost):
    job = timeline.wait(timeline.finished, 600, "the FineTuneJob to finish")
    status = job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["progress"]["step"] == STEPS and status["placement"]["attempt"] == 2
