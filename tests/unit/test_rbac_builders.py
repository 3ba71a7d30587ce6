"""RBAC builders, table-driven on literal inputs (KubeRay's rbac_test.go style): an owner written
out, the rules given; no example file, no placement, no fleet."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tuneserve.api.common import ObjectMeta
from tuneserve.builders.rbac import build_rbac

RULES = [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["x-progress"], "verbs": ["get", "update", "patch"]}]


@dataclass(frozen=True)
class Owner:
    api_version: str
    kind: str
    metadata: ObjectMeta


JOB = Owner("tuneserve.dev/v1alpha1", "FineTuneJob", ObjectMeta(name="x", namespace="team", uid="u-1"))
SERVE = Owner("tuneserve.dev/v1alpha1", "ModelServe", ObjectMeta(name="x", namespace="team", uid="u-2"))


@pytest.mark.parametrize("owner, user_account, kinds, subject, owner_label", [
    (JOB, None, ["ServiceAccount", "Role", "RoleBinding"], "x-own", "tuneserve.dev/finetunejob"),
    (JOB, "workload-identity", ["Role", "RoleBinding"], "workload-identity", "tuneserve.dev/finetunejob"),
    (SERVE, None, ["ServiceAccount", "Role", "RoleBinding"], "x-own", "tuneserve.dev/modelserve"),
    (SERVE, "bring-your-own", ["Role", "RoleBinding"], "bring-your-own", "tuneserve.dev/modelserve"),
], ids=["job-own-account", "job-user-account", "serve-own-account", "serve-user-account"])
def test_build_rbac(owner, user_account, kinds, subject, owner_label):
    objects = build_rbac(owner, user_account, "x-own", "x-role", RULES)
    assert [o["kind"] for o in objects] == kinds
    role, binding = objects[-2:]
    assert role["metadata"]["name"] == binding["metadata"]["name"] == "x-role" and role["rules"] == RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "x-role"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": subject, "namespace": "team"}]
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "team" and meta["labels"][owner_label] == "x"
        assert meta["ownerReferences"] == [{"apiVersion": owner.api_version, "kind": owner.kind, "name": "x",
                                            "uid": owner.metadata.uid, "controller": True, "blockOwnerDeletion": True}]
    if "ServiceAccount" in kinds:
        assert objects[0]["automountServiceAccountToken"] is True
