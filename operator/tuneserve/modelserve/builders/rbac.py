"""Serve replicas may write their status ConfigMap and read/watch their adapters ConfigMap."""
from __future__ import annotations

from typing import Any

from tuneserve.api.modelserve import ModelServe
from tuneserve.builders.common import (
    adapters_configmap_name, serve_service_account_name, serve_status_configmap_name, serve_status_role_name,
)
from tuneserve.builders.rbac import build_rbac


def build_serve_rbac(serve: ModelServe) -> list[dict[str, Any]]:
    """For a ModelServe's replicas: write the status ConfigMap, read/watch the adapters one."""
    name = serve.metadata.name
    return build_rbac(serve, serve.spec.service_account_name, serve_service_account_name(name), serve_status_role_name(name), [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [serve_status_configmap_name(name)],
         "verbs": ["get", "update", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [adapters_configmap_name(name)],
         "verbs": ["get", "list", "watch"]},
    ])


def serve_pod_service_account(serve: ModelServe) -> str:
    return serve.spec.service_account_name or serve_service_account_name(serve.metadata.name)
