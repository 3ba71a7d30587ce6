"""What the real-node fault modules (test_real_faults.py, test_real_pool_loss.py) observe of one
FineTuneJob: its timeline (progress document and status, as it changes) and the checkpoints its
worker committed in MinIO."""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

from kubernetes.client.exceptions import ApiException

import waiting
from tuneserve_workers.contract import PROGRESS_KEY, Progress


class Timeline:
    """What the test saw of the job ``name`` in ``namespace``, in order: the progress document (the
    ConfigMap the worker writes, which the operator folds into status) and the status' phase,
    restarts and placement attempt."""

    def __init__(self, kube, namespace: str, name: str):
        self.kube, self.namespace, self.name = kube, namespace, name
        self.t0, self.lines, self.last = time.monotonic(), [], None

    def ftj(self) -> dict:
        return self.kube.get("tuneserve.dev/v1alpha1", "FineTuneJob", self.name, self.namespace) or {}

    def progress(self) -> Optional[Progress]:
        cm = self.kube.get("v1", "ConfigMap", f"{self.name}-progress", self.namespace) or {}
        doc = (cm.get("data") or {}).get(PROGRESS_KEY)
        p = Progress.model_validate_json(doc) if doc else None
        status = self.ftj().get("status") or {}
        ours = (p.state, p.step, p.last_checkpoint and p.last_checkpoint.step, p.resumed_from_step) if p else (None,) * 4
        seen = (*ours, status.get("phase"), status.get("restarts"), (status.get("placement") or {}).get("attempt"))
        if seen != self.last:
            self.last = seen
            self.note("state={} step={} checkpoint={} resumedFrom={} phase={} restarts={} attempt={}".format(*seen))
        return p

    def note(self, what: str) -> None:
        self.lines.append(f"{time.monotonic() - self.t0:6.1f}s {what}")

    def text(self) -> str:
        return "\ntimeline:\n  " + "\n  ".join(self.lines)

    def wait(self, fn: Callable, timeout: float, what: str):
        """waiting.wait_for with API errors as "not yet" and the timeline in a timeout's message."""
        return waiting.wait_for(fn, timeout, what, retry=(ApiException,), on_timeout=self.text)

    def resumed(self, after: int, timeout: float = 600) -> Progress:
        """The first report of a run resumed from a checkpoint newer than step ``after``."""
        return self.wait(lambda: (p := self.progress()) and p.state == "Running" and p.resumed_from_step is not None
                         and p.resumed_from_step > after and p, timeout, f"a run resumed from after step {after}")

    def finished(self) -> Optional[dict]:
        """The job once its phase is Succeeded or Failed (None before)."""
        self.progress()
        job = self.ftj()
        return job if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None


def committed(storage, name: str) -> dict[int, dict]:
    """step -> COMMITTED marker of the job's checkpoints in MinIO (one pruned meanwhile is left out)."""
    server, where = storage
    fs = server.filesystem()
    root = where.uri("checkpoints", name).removeprefix("s3://")
    fs.invalidate_cache()
    out = {}
    for path in fs.ls(root, detail=False, refresh=True):
        leaf = path.rsplit("/", 1)[-1]
        if not leaf.startswith("step-"):
            continue
        try:
            out[int(leaf.removeprefix("step-"))] = json.loads(fs.cat(f"{path}/COMMITTED"))
        except FileNotFoundError:
            pass
    return out


def between_checkpoints(p: Optional[Progress], resumed_from: Optional[int], steps: int, interval: int) -> bool:
    """A report of the run that resumed from ``resumed_from`` (None: the first run) between two of
    its checkpoints (the one it resumed from counts), with room left before the last step."""
    return bool(p and p.state == "Running" and p.resumed_from_step == resumed_from and p.last_checkpoint
                and p.last_checkpoint.step < p.step < steps - interval)
