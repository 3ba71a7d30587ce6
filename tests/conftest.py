"""Session-wide fixtures: one real local control plane per test session, a namespace per test."""
from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack"))
sys.path.insert(0, str(REPO / "tests"))

from fake_dashboard import DashboardClient  # noqa: E402
from kube import Kube, wait_for  # noqa: E402
from localcluster import BIN, LocalCluster  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> LocalCluster:
    """The local control plane. TUNESERVE_CLUSTER_DIR reuses one started by `make cluster-up`.

    Missing binaries fail the test rather than skip it: the control-plane tests must always run.
    Only one real node can run per machine: LocalCluster.start fails at once (it takes the flock
    /tmp/tuneserve-realnode.lock) when another session's cluster holds it.
    """
    existing = os.environ.get("TUNESERVE_CLUSTER_DIR")
    if existing:
        yield LocalCluster.attach(Path(existing))
        return
    if not (BIN / "kube-apiserver").exists():
        pytest.fail(f"control-plane binaries missing in {BIN}: run `make binaries` (hack/build-binaries.sh)")
    c = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield c
    finally:
        c.stop()
        print(f"\ncontrol-plane logs kept in {c.logs}", file=sys.stderr)
    # The real node changes the host (processes, mounts, cgroups, iptables, routes, a bridge,
    # sysctls): anything its teardown left fails the session loudly (hack/realnode.py leftovers).
    if c.real_node is not None and c.real_node.leftovers:
        pytest.fail("real node teardown left on this machine:\n  " + "\n  ".join(c.real_node.leftovers)
                    + "\n(`python hack/realnode.py cleanup` removes them)")


@pytest.fixture(scope="session")
def kube(cluster) -> Kube:
    return Kube(cluster.kubeconfig)


@pytest.fixture(scope="session")
def dashboard(cluster) -> DashboardClient:
    """Drives the Ray dashboard stand-in that the KubeRay operator talks to."""
    return DashboardClient(cluster.dashboard_url)


@pytest.fixture
def namespace(kube, request) -> str:
    """A fresh namespace per test, deleted afterwards (its objects go with it)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:5]}"
    kube.core.create_namespace({"metadata": {"name": name, "labels": {"tuneserve.dev/test": "true"}}})
    # Pods are admitted only once the namespace's default ServiceAccount exists (made by KCM).
    wait_for(lambda: kube.get("v1", "ServiceAccount", "default", name), 60, f"default SA in {name}")
    yield name
    had_pods = bool(kube.list("v1", "Pod", name))
    kube.core.delete_namespace(name)
    if had_pods:
        # Accelerators held by this test's pods must be free before the next test places anything.
        wait_for(lambda: not kube.list("v1", "Pod", name), 90, f"the pods of namespace {name} to go")


@pytest.fixture(scope="session")
def tuneserve_crds(cluster) -> list[str]:
    """tuneserve's generated CRDs, installed and Established."""
    files = sorted((REPO / "crds").glob("tuneserve.dev_*.yaml"))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *[a for f in files for a in ("-f", str(f))])
    names = [f.name.removeprefix("tuneserve.dev_").removesuffix(".yaml") + ".tuneserve.dev" for f in files]
    cluster.wait_crds_established(names, 60)
    return names


@pytest.fixture(scope="session")
def operator(cluster, tuneserve_crds) -> OperatorProcess:
    """The tuneserve operator, running as a process against the local control plane."""
    proc = OperatorProcess(cluster.kubeconfig, cluster.logs)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _without(operator: OperatorProcess):
    operator.stop()
    try:
        yield
    finally:
        operator.start()


@pytest.fixture
def no_session_operator(operator):
    """For tests that run operators of their own (leader election, the Helm-installed one):
    the session's operator is stopped meanwhile, so no second reconciler acts, then restarted."""
    yield from _without(operator)


@pytest.fixture(scope="module")
def no_session_operator_module(operator):
    """no_session_operator for a whole module (the real-node story)."""
    yield from _without(operator)
