"""Names, labels and owner references shared by every child object of a FineTuneJob or a
ModelServe (the "owner")."""
from __future__ import annotations

import re
from typing import Any, Protocol

from tuneserve.api.common import ObjectMeta

MANAGED_BY = "tuneserve"
JOB_LABEL = "tuneserve.dev/finetunejob"
SERVE_LABEL = "tuneserve.dev/modelserve"
OWNER_LABELS = {"FineTuneJob": JOB_LABEL, "ModelServe": SERVE_LABEL}
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


def rayservice_name(serve_name: str) -> str:
    """One RayService per ModelServe, for its whole life: KubeRay rolls engine changes out on a
    new RayCluster behind it (upgradeStrategy NewCluster)."""
    return serve_name


def adapters_configmap_name(serve_name: str) -> str:
    return f"{serve_name}-adapters"


def serve_status_configmap_name(serve_name: str) -> str:
    return f"{serve_name}-serve-status"


def openai_service_name(serve_name: str) -> str:
    return f"{serve_name}-openai"


def serve_service_account_name(serve_name: str) -> str:
    return f"{serve_name}-serve"


def serve_status_role_name(serve_name: str) -> str:
    return f"{serve_name}-serve-status-writer"


def dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


class Owner(Protocol):
    """A parsed tuneserve resource (FineTuneJob, ModelServe)."""
    api_version: str
    kind: str
    metadata: ObjectMeta


def labels(owner: Owner, attempt: int | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/managed-by": MANAGED_BY, OWNER_LABELS[owner.kind]: owner.metadata.name}
    if attempt is not None:
        out[ATTEMPT_LABEL] = str(attempt)
    return out


def owner_references(owner: Owner) -> list[dict[str, Any]]:
    return [{
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": owner.metadata.name,
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }]


def object_meta(owner: Owner, name: str, attempt: int | None = None, **extra: Any) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": owner.metadata.namespace,
        "labels": labels(owner, attempt),
        "ownerReferences": owner_references(owner),
    }
    meta.update(extra)
    return meta
