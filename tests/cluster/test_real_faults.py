"""Training faults on the real node (issue 15): one FineTuneJob of the story (hack/realstory.py)
trains on the real-cpu pool and loses its Ray worker pod twice, then still ends Succeeded.

1. Killed: every process of the worker pod is SIGKILLed between two checkpoints, as the OOM killer
   or a crashed node would (no preStop, no emergency checkpoint). Ray Train fails the run
   (TUNESERVE_MAX_FAILURES is 0), the entrypoint exits non-zero, KubeRay retries the RayJob on a
   new Ray cluster (spec.backoffLimit) and the worker resumes from the newest committed
   checkpoint: at most one checkpoint interval of steps is lost.
2. Drained: the worker pod is deleted with its grace period; its preStop hook signals the training
   process (TUNESERVE_DRAIN_DIR), which commits an emergency checkpoint of the step it reached and
   exits; the retry resumes from exactly that step: no step is lost.

Steps lost = the step the job had reached when the fault hit (killed: the step it reported a
fraction of a second before, about one step's time; drained: the step of its emergency checkpoint)
- the step the resumed run started from (``resumed_from_step`` of the job's progress document).
The newest checkpoint committed before the kill bounds the loss to one interval whatever the
report's delay. The stages are module-scoped fixtures in order (the shared ones in conftest.py);
the timeline of what was observed is printed and goes into every timeout's message.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Optional

import pytest

import realstory as story
from realjob import Timeline, between_checkpoints, committed
from tuneserve_workers.contract import Progress

pytestmark = pytest.mark.cluster
NS, FTJ = "real-faults", "faults"
# The worker reports progress every 10 s and at each checkpoint. A step of 16 samples takes ~0.5 s on
# the real node, so an interval of INTERVAL steps (~25 s) holds reports between two checkpoints: the
# faults hit right after one, at a known step.
STEPS, INTERVAL, BATCH, BACKOFF_LIMIT = 160, 50, 16, 2
WORKER_PODS = f"tuneserve.dev/finetunejob={FTJ},ray.io/node-type=worker"


def _worker_pod(kube) -> Optional[dict]:
    """The Ray worker pod that trains now: Running, not being deleted."""
    pods = [p for p in kube.list("v1", "Pod", NS, label_selector=WORKER_PODS)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 else None


def _container_id(pod: dict) -> str:
    status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "ray-worker")
    return status["containerID"].split("://", 1)[1]


def _between_checkpoints(p: Optional[Progress], resumed_from: Optional[int]) -> bool:
    return between_checkpoints(p, resumed_from, STEPS, INTERVAL)


def _resumed(timeline: Timeline, after: int, timeout: float = 600) -> Progress:
    """The retried run's first report: resumed from a checkpoint newer than step ``after``. A retry
    takes ~1.5 min; up to the pods' 300 s grace period more when the worker pod KubeRay started in
    place of the lost one is still in ``ray start`` as the cluster goes (docs/training-worker.md)."""
    return timeline.resumed(after, timeout)


@pytest.fixture(scope="module")
def timeline(kube, helm_operator, storage, story_namespace) -> Timeline:
    """The job, created; its timeline printed at the end."""
    _, where = storage
    kube.apply(story.build_finetunejob(FTJ, NS, where, training={"maxSteps": STEPS, "globalBatchSize": BATCH},
                                       checkpoint_interval=INTERVAL, backoff_limit=BACKOFF_LIMIT))
    t = Timeline(kube, NS, FTJ)
    yield t
    print(t.text())


@pytest.fixture(scope="module")
def killed(kube, cluster, storage, timeline) -> dict:
    """The worker pod's processes SIGKILLed between two checkpoints; the run resumed after it."""
    before = timeline.wait(lambda: (p := timeline.progress()) and _between_checkpoints(p, None) and p, 600,
                           "the first run to report a step between two checkpoints")
    pod = _worker_pod(kube)
    assert pod, "one Running worker pod"
    cluster.real_node.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", _container_id(pod))
    age = (datetime.now(timezone.utc) - before.updated_at).total_seconds()
    timeline.note(f"SIGKILLed the processes of {pod['metadata']['name']} {age:.1f}s after it reported step {before.step}")
    uid = pod["metadata"]["uid"]
    timeline.wait(lambda: not any(p["metadata"]["uid"] == uid and p["status"].get("phase") == "Running"
                                  for p in kube.list("v1", "Pod", NS, label_selector=WORKER_PODS)), 60,
                  "the killed worker pod to stop running")
    newest = max(committed(storage, FTJ).items(), default=(None, {}))
    after = _resumed(timeline, 0)
    return {"before": before, "report_age_s": age, "after": after, "newest_at_kill": newest,
            "status": timeline.ftj()["status"]}


def test_a_killed_worker_pod_resumes_with_at_most_one_interval_lost(killed):
    before, after = killed["before"], killed["after"]
    lost = before.step - after.resumed_from_step
    print(f"\nkilled {killed['report_age_s']:.1f}s after reporting step {before.step} (last checkpoint "
          f"{before.last_checkpoint.step}); resumed from step {after.resumed_from_step}: {lost} steps lost "
          f"(interval {INTERVAL})")
    assert after.resumed_from_step >= before.last_checkpoint.step, "a committed checkpoint was skipped"
    assert 0 <= lost <= INTERVAL
    step, marker = killed["newest_at_kill"]
    assert step == after.resumed_from_step and not marker["meta"].get("drained"), \
        "a hard kill commits no emergency checkpoint: the run resumes from its last periodic one"
    status = killed["status"]
    assert status["restarts"] == 1 and status["phase"] in ("Starting", "Running"), json.dumps(status, indent=1)


@pytest.fixture(scope="module")
def drained(kube, storage, timeline, killed) -> dict:
    """The worker pod deleted with its grace period (preStop drain); the run resumed after it."""
    resumed = killed["after"].resumed_from_step
    before = timeline.wait(lambda: (p := timeline.progress()) and _between_checkpoints(p, resumed) and p, 600,
                           "the resumed run to report a step between two checkpoints")
    pod = _worker_pod(kube)
    assert pod, "one Running worker pod"
    kube.core.delete_namespaced_pod(pod["metadata"]["name"], NS)
    timeline.note(f"deleted {pod['metadata']['name']} (grace period {pod['spec']['terminationGracePeriodSeconds']}s) "
                  f"at reported step {before.step}")
    step, marker = timeline.wait(
        lambda: next(((s, m) for s, m in sorted(committed(storage, FTJ).items(), reverse=True)
                      if s >= before.step and m["meta"].get("drained")), None),
        120, "an emergency checkpoint marked drained")
    timeline.note(f"emergency checkpoint of step {step} committed ({marker['meta']['drained']})")
    uid, deleted_at = pod["metadata"]["uid"], time.monotonic()
    timeline.wait(lambda: all(p["metadata"]["uid"] != uid for p in kube.list("v1", "Pod", NS)), 120,
                  "the drained pod to go (preStop stops Ray, so ray start, PID 1, exits)")
    gone_s = time.monotonic() - deleted_at
    timeline.note(f"the drained pod was gone {gone_s:.0f}s after its deletion")
    after = _resumed(timeline, resumed)
    return {"before": before, "drained_step": step, "marker": marker, "after": after, "gone_s": gone_s,
            "status": timeline.ftj()["status"]}


def test_a_drained_worker_pod_resumes_from_the_step_it_reached(drained):
    after = drained["after"]
    lost = drained["drained_step"] - after.resumed_from_step
    print(f"\ndrained at step {drained['drained_step']} (reported {drained['before'].step} when the pod was "
          f"deleted); resumed from step {after.resumed_from_step}: {lost} steps lost")
    assert drained["marker"]["meta"]["drained"] == "SIGTERM"
    assert lost == 0
    assert drained["gone_s"] < 120, "the pod held its devices for the grace period after the drain"
    status = drained["status"]
    assert status["restarts"] == 2 and status["phase"] in ("Starting", "Running"), json.dumps(status, indent=1)


def test_the_job_succeeds_after_both_faults_within_its_backoff_limit(timeline, drained):
    job = timeline.wait(timeline.finished, 600, "the FineTuneJob to finish")
    status = job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["progress"]["step"] == STEPS
    assert status["restarts"] == 2 <= job["spec"]["backoffLimit"]
