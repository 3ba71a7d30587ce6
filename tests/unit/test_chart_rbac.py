"""The chart's RBAC and the operator's Deployment, rendered by the real helm binary (`helm template`,
no cluster): one ClusterRole when watching every namespace; with `watchNamespaces` set, a Role +
RoleBinding per watched namespace holding exactly the namespaced rules and a ClusterRole holding
only cluster-scoped reads plus the one justified cluster-wide read of a namespaced kind (pods, for
placement). Never a wildcard. tests/cluster/test_chart.py checks the same rules against kopf's
registered watches and runs the operator with them.

helm is built by `make binaries` (hack/build-binaries.sh) into
$TUNESERVE_CACHE/bin/helm-<HELM_VERSION>/; these tests skip until it exists.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tuneserve"
RELEASE, RELEASE_NS = "ts", "tuneserve-system"
OPERATOR = f"{RELEASE}-operator"
READ = {"get", "list", "watch"}
APPLY = READ | {"create", "patch"}

# Everything the operator does in a namespace it watches (written out: a change to the chart or
# to the operator's needs shows up here).
NAMESPACED = {
    ("tuneserve.dev", "finetunejobs"): READ | {"patch"},
    ("tuneserve.dev", "modelserves"): READ | {"patch"},
    ("tuneserve.dev", "finetunejobs/status"): {"get", "patch"},
    ("tuneserve.dev", "modelserves/status"): {"get", "patch"},
    ("ray.io", "rayjobs"): APPLY | {"delete"},
    ("ray.io", "rayservices"): APPLY,
    ("ray.io", "rayclusters"): READ | {"patch"},
    ("", "configmaps"): APPLY | {"update"},
    ("", "serviceaccounts"): APPLY,
    ("rbac.authorization.k8s.io", "roles"): APPLY,
    ("rbac.authorization.k8s.io", "rolebindings"): APPLY,
    ("", "secrets"): READ,
    ("", "persistentvolumeclaims"): READ,   # names only: a spec's pvc:// URIs (core/references.py)
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# Cluster-scoped kinds the operator (or kopf) reads.
CLUSTER_SCOPED = {
    ("", "nodes"): READ,
    ("apiextensions.k8s.io", "customresourcedefinitions"): READ,
    ("", "namespaces"): READ,
    ("scheduling.k8s.io", "priorityclasses"): READ,   # names only: a spec's priorityClassName
}
# Namespaced kinds read cluster-wide even when watchNamespaces is set, and why: placement counts
# the requests of every pod bound to an accelerator node, whatever its namespace.
JUSTIFIED_CLUSTER_WIDE = {("", "pods"): READ}
CLUSTER_WIDE = {**CLUSTER_SCOPED, **JUSTIFIED_CLUSTER_WIDE}
LEASE = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def pinned(name: str) -> str:
    return re.search(rf"^{name}=(\S+)", (REPO / "hack" / "versions.env").read_text(), re.M).group(1)


def helm_binary() -> Path:
    cache = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))
    return cache / "bin" / f"helm-{pinned('HELM_VERSION')}" / "helm"


def render(tmp_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    helm = helm_binary()
    if not helm.exists():
        pytest.skip(f"helm not built yet ({helm}): run `make binaries`")
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp_path / "cache"), "HELM_CONFIG_HOME": str(tmp_path / "config"),
           "HELM_DATA_HOME": str(tmp_path / "data")}
    out = subprocess.run([str(helm), "template", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                          "--kube-version", pinned("K8S_VERSION"), "-f", str(values_file)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[tuple[str | None, str], dict[str, Any]]:
    return {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs if d["kind"] == kind}


CASES = [
    # watchNamespaces, ClusterRole grants, namespaces holding the operator's Role
    pytest.param([], {**CLUSTER_WIDE, **NAMESPACED}, [], id="all-namespaces"),
    pytest.param(["a", "b"], CLUSTER_WIDE, ["a", "b"], id="two-namespaces"),
    pytest.param(["team-x"], CLUSTER_WIDE, ["team-x"], id="one-namespace"),
    pytest.param([RELEASE_NS, "a"], CLUSTER_WIDE, [RELEASE_NS, "a"], id="release-namespace-watched"),
]


@pytest.mark.parametrize("watch, cluster_grants, role_namespaces", CASES)
def test_rbac_per_watch_mode(tmp_path, watch, cluster_grants, role_namespaces):
    docs = render(tmp_path, {"watchNamespaces": watch})
    cluster_roles = of_kind(docs, "ClusterRole")
    assert list(cluster_roles) == [(None, OPERATOR)]
    assert grants(cluster_roles[(None, OPERATOR)]) == cluster_grants
    roles = of_kind(docs, "Role")
    assert grants(roles.pop((RELEASE_NS, f"{OPERATOR}-leader-election"))) == LEASE
    assert sorted(roles) == sorted((ns, OPERATOR) for ns in role_namespaces)
    for role in roles.values():
        assert grants(role) == NAMESPACED, role["metadata"]
    bindings = of_kind(docs, "RoleBinding")
    bindings.pop((RELEASE_NS, f"{OPERATOR}-leader-election"))
    assert sorted(bindings) == sorted(roles)
    for binding in bindings.values():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": RELEASE_NS}]
    cluster_binding = of_kind(docs, "ClusterRoleBinding")[(None, OPERATOR)]
    assert cluster_binding["roleRef"]["name"] == OPERATOR
    env = {e["name"]: e.get("value") for e in of_kind(docs, "Deployment")[(RELEASE_NS, OPERATOR)]
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TUNESERVE_NAMESPACES"] == ",".join(watch)


@pytest.mark.parametrize("watch", [c.values[0] for c in CASES])
def test_no_wildcards_and_secrets_read_only(tmp_path, watch):
    docs = render(tmp_path, {"watchNamespaces": watch})
    for role in [d for d in docs if d["kind"] in ("Role", "ClusterRole")]:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"], rule)
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        secrets = grants(role).get(("", "secrets"), set())
        assert secrets <= READ, "Secrets: key names are indexed, nothing is ever written"


@pytest.mark.parametrize("watch", [c.values[0] for c in CASES if c.values[0]])
def test_namespaced_kinds_are_granted_cluster_wide_only_where_justified(tmp_path, watch):
    docs = render(tmp_path, {"watchNamespaces": watch})
    cluster = grants(of_kind(docs, "ClusterRole")[(None, OPERATOR)])
    namespaced_in_cluster_role = {k: v for k, v in cluster.items() if k not in CLUSTER_SCOPED}
    assert namespaced_in_cluster_role == JUSTIFIED_CLUSTER_WIDE
    assert all(v <= READ for v in namespaced_in_cluster_role.values()), "cluster-wide: reads only"
    assert ("", "secrets") not in cluster, "Secrets are read only in the watched namespaces"


def _containerfile_user(name: str) -> int:
    users = re.findall(r"^USER\s+(\d+)", (REPO / "images" / name).read_text(), re.M)
    assert users, f"{name}: no numeric USER"
    return int(users[-1])


def test_operator_runs_as_the_images_non_root_user_on_a_read_only_root(tmp_path):
    docs = render(tmp_path, {})
    pod = of_kind(docs, "Deployment")[(RELEASE_NS, OPERATOR)]["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": _containerfile_user("operator.Containerfile"),
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = pod["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}, "the only writable path is the /tmp emptyDir (HOME)"
