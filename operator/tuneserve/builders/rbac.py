"""Least privilege for the code in the Ray pods, the shape both kinds render: a ServiceAccount
(unless the user brings one), a Role on named ConfigMaps, and its RoleBinding."""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.builders.common import Owner, object_meta


def build_rbac(owner: Owner, user_account: Optional[str], own_account: str, role: str,
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
