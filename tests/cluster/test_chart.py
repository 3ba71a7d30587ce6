"""The Helm chart installs on the real API server, and the operator works with exactly its RBAC."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from kube import wait_for
from localcluster import BIN
from operator_process import OperatorProcess

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tuneserve"
K8S_VERSION = next(line.split("=", 1)[1].strip() for line in (REPO / "hack" / "versions.env").read_text().splitlines()
                   if line.startswith("K8S_VERSION="))


def helm(cluster, *args: str) -> str:
    out = subprocess.run([str(BIN / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_chart_lints_and_its_crds_are_the_generated_ones(cluster):
    helm(cluster, "lint", str(CHART))
    for link in (CHART / "crds").iterdir():
        assert link.read_text() == (REPO / "crds" / link.name).read_text()
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))


def test_rbac_has_no_wildcards(cluster):
    docs = [d for d in yaml.safe_load_all(helm(cluster, "template", "ts", str(CHART), "--validate")) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    # The operator indexes Secrets' key names (never their values) so that a reference is checked
    # without a GET per object per tick (issue 14): it reads Secrets (list/watch) and never writes them.
    assert secrets and all(set(r["verbs"]) <= {"get", "list", "watch"} for r in secrets), "Secrets: read only, never written"


# Kind -> (group, plural) of what the operator touches, for comparing with the chart's rules.
PLURALS = {"ConfigMap": ("", "configmaps"), "ServiceAccount": ("", "serviceaccounts"),
           "Role": ("rbac.authorization.k8s.io", "roles"), "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
           "RayJob": ("ray.io", "rayjobs"), "RayService": ("ray.io", "rayservices"), "RayCluster": ("ray.io", "rayclusters")}
# What the operator needs beyond watching and applying, and why (each is asserted, not assumed).
EXTRA_GRANTS = {
    ("ray.io", "rayjobs"): {"delete"},                        # a fallback deletes the attempt it leaves
    ("ray.io", "rayclusters"): {"patch"},                     # replica bounds (modelserve/reconcile.py)
    ("", "configmaps"): {"update"},                           # granted onward in the per-job Roles
    ("tuneserve.dev", "finetunejobs"): {"patch"}, ("tuneserve.dev", "modelserves"): {"patch"},   # kopf's annotations
    ("tuneserve.dev", "finetunejobs/status"): {"get", "patch"}, ("tuneserve.dev", "modelserves/status"): {"get", "patch"},
    ("", "events"): {"create", "patch"}, ("events.k8s.io", "events"): {"create", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},   # kopf's discovery
    ("", "namespaces"): {"get", "list", "watch"},             # kopf, when watching namespace patterns
}


def _granted(role: dict) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def _needed() -> dict[tuple[str, str], set[str]]:
    """From the operator itself: kopf's registered watches need get/list/watch; every kind the
    builders render (the golden files) is server-side applied: create + patch."""
    import kopf
    import tuneserve.controller.handlers  # noqa: F401  (registers the handlers)
    registry = kopf.get_default_registry()
    needed: dict[tuple[str, str], set[str]] = {}
    for sub in (registry._indexing, registry._watching, registry._spawning):
        for handler in sub.get_all_handlers():
            sel = handler.selector
            needed.setdefault((sel.group or "", sel.any_name), set()).update({"get", "list", "watch"})
    for golden in (REPO / "tests" / "unit" / "golden").glob("*.yaml"):
        for doc in yaml.safe_load_all(golden.read_text()):
            if doc and doc["kind"] in PLURALS:
                needed.setdefault(PLURALS[doc["kind"]], set()).update({"create", "patch"})
    for key, verbs in EXTRA_GRANTS.items():
        needed.setdefault(key, set()).update(verbs)
    return needed


def test_rbac_is_exactly_what_the_operator_uses(cluster):
    docs = [d for d in yaml.safe_load_all(helm(cluster, "template", "ts", str(CHART), "--kube-version", K8S_VERSION)) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert _granted(role) == _needed()
    lease_role = next(d for d in docs if d["kind"] == "Role")
    assert _granted(lease_role) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def test_operator_runs_with_only_the_charts_permissions(cluster, kube, namespace, tuneserve_crds):
    """helm install (operator Deployment scaled to 0: kwok pods run nothing), then run the operator
    with a token of the chart's ServiceAccount: placement and children work with that RBAC."""
    release_ns = f"{namespace}-sys"
    helm(cluster, "install", "ts", str(CHART), "--namespace", release_ns, "--create-namespace",
         "--set", "replicas=0", "--skip-crds", "--wait", "--timeout", "60s")
    try:
        token = cluster.kubectl("create", "token", "ts-operator", "-n", release_ns, "--duration", "1h").stdout.strip()
        cfg = yaml.safe_load(cluster.kubeconfig.read_text())
        cfg["users"][0]["user"] = {"token": token}
        sa_kubeconfig = cluster.dir / f"sa-{namespace}.kubeconfig"
        sa_kubeconfig.write_text(yaml.safe_dump(cfg))
        log_dir = cluster.logs / f"operator-as-chart-sa-{namespace}"
        log_dir.mkdir()
        proc = OperatorProcess(sa_kubeconfig, log_dir, env={"TUNESERVE_NAMESPACES": namespace})
        proc.start()
        try:
            doc = yaml.safe_load((REPO / "crds" / "examples" / "finetunejob-minimal.yaml").read_text())
            kube.apply(doc, namespace)
            rj = wait_for(lambda: kube.list("ray.io/v1", "RayJob", namespace), 60, "the RayJob, created with the chart's RBAC")
            assert rj[0]["metadata"]["name"] == "tiny-1"
            wait_for(lambda: (kube.get("tuneserve.dev/v1alpha1", "FineTuneJob", "tiny", namespace).get("status") or {})
                     .get("placement"), 30, "status written with the chart's RBAC")
            assert "Forbidden" not in proc.log_tail(100_000), proc.log_tail()
        finally:
            proc.stop()
    finally:
        helm(cluster, "uninstall", "ts", "--namespace", release_ns, "--wait")
        kube.core.delete_namespace(release_ns)
