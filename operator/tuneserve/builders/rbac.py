"""Least privilege for the training worker: update its own progress ConfigMap, nothing else."""
from __future__ import annotations

from typing import Any

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.common import (
    object_meta, progress_configmap_name, progress_role_name, worker_service_account_name,
)


def pod_service_account(job: FineTuneJob) -> str:
    """The user's service account (e.g. for workload identity) or the one the operator creates."""
    return job.spec.service_account_name or worker_service_account_name(job.metadata.name)


def build_worker_rbac(job: FineTuneJob) -> list[dict[str, Any]]:
    """ServiceAccount (unless the user brings one), Role on the one ConfigMap, RoleBinding."""
    name = job.metadata.name
    objects: list[dict[str, Any]] = []
    if not job.spec.service_account_name:
        objects.append({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": object_meta(job, worker_service_account_name(name)),
            "automountServiceAccountToken": True,
        })
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(job, progress_role_name(name)),
        "rules": [{
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [progress_configmap_name(name)],
            "verbs": ["get", "update", "patch"],
        }],
    })
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(job, progress_role_name(name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": progress_role_name(name)},
        "subjects": [{"kind": "ServiceAccount", "name": pod_service_account(job), "namespace": job.metadata.namespace}],
    })
    return objects
