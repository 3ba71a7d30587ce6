"""Least privilege for the code in the Ray pods: the training worker may update its own progress
ConfigMap; serve replicas may write their status ConfigMap and read their adapters ConfigMap."""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.common import (
    Owner, adapters_configmap_name, object_meta, progress_configmap_name, progress_role_name,
    serve_service_account_name, serve_status_configmap_name, serve_status_role_name,
    worker_service_account_name,
)


def pod_service_account(job: FineTuneJob) -> str:
    """The user's service account (e.g. for workload identity) or the one the operator creates."""
    return job.spec.service_account_name or worker_service_account_name(job.metadata.name)


def _rbac(owner: Owner, user_account: Optional[str], own_account: str, role: str,
          rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ServiceAccount (unless the user brings one), Role, RoleBinding."""
    objects: list[dict[str, Any]] = []
    if not user_account:
        objects.append({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": object_meta(owner, own_account),
            "automountServiceAccountToken": True,
        })
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(owner, role),
        "rules": rules,
    })
    objects.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(owner, role),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": user_account or own_account, "namespace": owner.metadata.namespace}],
    })
    return objects


def build_worker_rbac(job: FineTuneJob) -> list[dict[str, Any]]:
    """ServiceAccount (unless the user brings one), Role on the one ConfigMap, RoleBinding."""
    name = job.metadata.name
    return _rbac(job, job.spec.service_account_name, worker_service_account_name(name), progress_role_name(name), [{
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [progress_configmap_name(name)],
        "verbs": ["get", "update", "patch"],
    }])


def build_serve_rbac(serve: Any) -> list[dict[str, Any]]:
    """For a ModelServe's replicas: write the status ConfigMap, read/watch the adapters one."""
    name = serve.metadata.name
    return _rbac(serve, serve.spec.service_account_name, serve_service_account_name(name), serve_status_role_name(name), [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [serve_status_configmap_name(name)],
         "verbs": ["get", "update", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [adapters_configmap_name(name)],
         "verbs": ["get", "list", "watch"]},
    ])


def serve_pod_service_account(serve: Any) -> str:
    return serve.spec.service_account_name or serve_service_account_name(serve.metadata.name)
