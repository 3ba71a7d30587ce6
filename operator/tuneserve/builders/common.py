"""Names, labels and owner references shared by every child object of a FineTuneJob."""
from __future__ import annotations

import re
from typing import Any

from tuneserve.api.finetunejob import FineTuneJob

MANAGED_BY = "tuneserve"
JOB_LABEL = "tuneserve.dev/finetunejob"
ATTEMPT_LABEL = "tuneserve.dev/attempt"
CHOICE_ANNOTATION = "tuneserve.dev/choice"
CONFIG_DIR = "/etc/tuneserve"
CONFIG_FILE = "config.json"
TRAIN_ENTRYPOINT = f"python -m tuneserve_workers.train --config {CONFIG_DIR}/{CONFIG_FILE}"


def rayjob_name(job_name: str, attempt: int) -> str:
    """One RayJob per placement attempt, so a fallback creates a new one beside the old."""
    return f"{job_name}-{attempt}"


def config_configmap_name(job_name: str, attempt: int) -> str:
    return f"{rayjob_name(job_name, attempt)}-config"


def progress_configmap_name(job_name: str) -> str:
    """Per job, not per attempt: progress continues across fallbacks (resume from checkpoint)."""
    return f"{job_name}-progress"


def worker_service_account_name(job_name: str) -> str:
    return f"{job_name}-worker"


def progress_role_name(job_name: str) -> str:
    return f"{job_name}-progress-writer"


def dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def labels(job: FineTuneJob, attempt: int | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/managed-by": MANAGED_BY, JOB_LABEL: job.metadata.name}
    if attempt is not None:
        out[ATTEMPT_LABEL] = str(attempt)
    return out


def owner_references(job: FineTuneJob) -> list[dict[str, Any]]:
    return [{
        "apiVersion": job.api_version,
        "kind": job.kind,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }]


def object_meta(job: FineTuneJob, name: str, attempt: int | None = None, **extra: Any) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job, attempt),
        "ownerReferences": owner_references(job),
    }
    meta.update(extra)
    return meta
