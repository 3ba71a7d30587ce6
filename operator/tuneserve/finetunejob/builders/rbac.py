"""The training worker may update its own progress ConfigMap, nothing else."""
from __future__ import annotations

from typing import Any

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.common import progress_configmap_name, progress_role_name, worker_service_account_name
from tuneserve.builders.rbac import build_rbac


def pod_service_account(job: FineTuneJob) -> str:
    """The user's service account (e.g. for workload identity) or the one the operator creates."""
    return job.spec.service_account_name or worker_service_account_name(job.metadata.name)


def build_worker_rbac(job: FineTuneJob) -> list[dict[str, Any]]:
    """ServiceAccount (unless the user brings one), Role on the one ConfigMap, RoleBinding."""
    name = job.metadata.name
    return build_rbac(job, job.spec.service_account_name, worker_service_account_name(name), progress_role_name(name), [{
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [progress_configmap_name(name)],
        "verbs": ["get", "update", "patch"],
    }])
