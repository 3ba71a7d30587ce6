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
from typing import Callable, Optional

import pytest
from kubernetes.client.exceptions import ApiException

import realstory as story
import waiting
from tuneserve_workers.contract import PROGRESS_KEY, Progress

pytestmark = pytest.mark.cluster
NS, FTJ = "real-faults", "faults"
# The worker reports progress every 10 s and at each checkpoint. A step of 16 samples takes ~0.5 s on
# the real node, so an interval of INTERVAL steps (~25 s) holds reports between two checkpoints: the
# faults hit right after one, at a known step.
STEPS, INTERVAL, BATCH, BACKOFF_LIMIT = 160, 50, 16, 2
WORKER_PODS = f"tuneserve.dev/finetunejob={FTJ},ray.io/node-type=worker"


class Timeline:
    """What the test saw of the job, in order: the progress document (the ConfigMap the worker
    writes, which the operator folds into status) and the status' phase and restarts."""

    def __init__(self, kube):
        self.kube, self.t0, self.lines, self.last = kube, time.monotonic(), [], None

    def ftj(self) -> dict:
        return self.kube.get("tuneserve.dev/v1alpha1", "FineTuneJob", FTJ, NS) or {}

    def progress(self) -> Optional[Progress]:
        cm = self.kube.get("v1", "ConfigMap", f"{FTJ}-progress", NS) or {}
        doc = (cm.get("data") or {}).get(PROGRESS_KEY)
        p = Progress.model_validate_json(doc) if doc else None
        status = self.ftj().get("status") or {}
        seen = (p.state, p.step, p.last_checkpoint and p.last_checkpoint.step, p.resumed_from_step,
                status.get("phase"), status.get("restarts")) if p else (None,) * 6
        if seen != self.last:
            self.last = seen
            self.note("state={} step={} checkpoint={} resumedFrom={} phase={} restarts={}".format(*seen))
        return p

    def note(self, what: str) -> None:
        self.lines.append(f"{time.monotonic() - self.t0:6.1f}s {what}")

    def text(self) -> str:
        return "\ntimeline:\n  " + "\n  ".join(self.lines)

    def wait(self, fn: Callable, timeout: float, what: str):
        """waiting.wait_for with API errors as "not yet" and the timeline in a timeout's message."""
        return waiting.wait_for(fn, timeout, what, retry=(ApiException,), on_timeout=self.text)


def _worker_pod(kube) -> Optional[dict]:
    """The Ray worker pod that trains now: Running, not being deleted."""
    pods = [p for p in kube.list("v1", "Pod", NS, label_selector=WORKER_PODS)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 else None


def _container_id(pod: dict) -> str:
    status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "ray-worker")
    return status["containerID"].split("://", 1)[1]


def _committed(storage) -> dict[int, dict]:
    """step -> COMMITTED marker of the job's checkpoints in MinIO (one pruned meanwhile is left out)."""
    server, where = storage
    fs = server.filesystem()
    root = where.uri("checkpoints", FTJ).removeprefix("s3://")
    fs.invalidate_cache()
    out = {}
    for path in fs.ls(root, detail=False, refresh=True):
        name = path.rsplit("/", 1)[-1]
        if not name.startswith("step-"):
            continue
        try:
            out[int(name.removeprefix("step-"))] = json.loads(fs.cat(f"{path}/COMMITTED"))
        except FileNotFoundError:
            pass
    return out


def _between_checkpoints(p: Optional[Progress], resumed_from: Optional[int]) -> bool:
    """A report of the run that resumed from ``resumed_from`` (None: the first run) between two of
    its checkpoints (the one it resumed from counts), with room left before the last step."""
    return bool(p and p.state == "Running" and p.resumed_from_step == resumed_from and p.last_checkpoint
                and p.last_checkpoint.step < p.step < STEPS - INTERVAL)


def _resumed(timeline: Timeline, after: int, timeout: float = 600) -> Progress:
    """The retried run's first report: resumed from a checkpoint newer than step ``after``. A retry
    takes ~1.5 min; up to the pods' 300 s grace period more when the worker pod KubeRay started in
    place of the lost one is still in ``ray start`` as the cluster goes (docs/training-worker.md)."""
    return timeline.wait(lambda: (p := timeline.progress()) and p.state == "Running" and p.resumed_from_step is not None
                         and p.resumed_from_step > after and p, timeout, f"a run resumed from after step {after}")


@pytest.fixture(scope="module")
def timeline(kube, helm_operator, storage, story_namespace) -> Timeline:
    """The job, created; its timeline printed at the end."""
    _, where = storage
    kube.apply(story.build_finetunejob(FTJ, NS, where, training={"maxSteps": STEPS, "globalBatchSize": BATCH},
                                       checkpoint_interval=INTERVAL, backoff_limit=BACKOFF_LIMIT))
    t = Timeline(kube)
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
    newest = max(_committed(storage).items(), default=(None, {}))
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
        lambda: next(((s, m) for s, m in sorted(_committed(storage).items(), reverse=True)
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


def _finished(timeline: Timeline) -> Optional[dict]:
    timeline.progress()
    job = timeline.ftj()
    return job if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None


def test_the_job_succeeds_after_both_faults_within_its_backoff_limit(timeline, drained):
    job = timeline.wait(lambda: _finished(timeline), 600, "the FineTuneJob to finish")
    status = job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["progress"]["step"] == STEPS
    assert status["restarts"] == 2 <= job["spec"]["backoffLimit"]
