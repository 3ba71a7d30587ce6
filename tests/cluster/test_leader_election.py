"""Two operator processes, one Lease: exactly one reconciles; the other takes over when the
leader is stopped (it releases the Lease) or killed (the Lease expires)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml

from kube import wait_for
from operator_process import OperatorProcess

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
LEASE = "tuneserve-operator-test"


def _operators(cluster, namespace: str) -> dict[str, OperatorProcess]:
    procs = {}
    for name in ("op-a", "op-b"):
        log_dir = cluster.logs / f"leader-{namespace}-{name}"
        log_dir.mkdir()
        procs[name] = OperatorProcess(cluster.kubeconfig, log_dir, env={
            "TUNESERVE_NAMESPACES": namespace, "TUNESERVE_LEADER_ELECTION": "true",
            "TUNESERVE_LEADER_ELECTION_NAMESPACE": namespace, "TUNESERVE_LEADER_ELECTION_NAME": LEASE,
            "TUNESERVE_POD_NAME": name})
    return procs


def _holder(kube, namespace: str) -> str:
    lease = kube.get("coordination.k8s.io/v1", "Lease", LEASE, namespace) or {}
    return (lease.get("spec") or {}).get("holderIdentity") or ""


def _submit(kube, namespace: str, name: str) -> None:
    doc = yaml.safe_load((REPO / "crds" / "examples" / "finetunejob-minimal.yaml").read_text())
    doc["metadata"]["name"] = name
    kube.apply(doc, namespace)


def _reconciled(kube, namespace: str, name: str) -> bool:
    return bool(kube.get("ray.io/v1", "RayJob", f"{name}-1", namespace))


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_one_leader_reconciles_and_the_standby_takes_over(cluster, kube, namespace, tuneserve_crds,
                                                          no_session_operator, how):
    procs = _operators(cluster, namespace)
    try:
        for proc in procs.values():
            proc.start()
        leader = wait_for(lambda: _holder(kube, namespace), 30, "a leader")
        standby = next(n for n in procs if n != leader)
        _submit(kube, namespace, "first")
        wait_for(lambda: _reconciled(kube, namespace, "first"), 60, "the leader to reconcile")
        assert "applied RayJob" not in procs[standby].log_tail(100_000), "the standby reconciled"

        t0 = time.monotonic()
        procs[leader].stop(signal.SIGTERM if how == "stopped" else signal.SIGKILL)
        wait_for(lambda: _holder(kube, namespace) == standby, 30, f"{standby} to take the Lease")
        took = time.monotonic() - t0
        _submit(kube, namespace, "second")
        wait_for(lambda: _reconciled(kube, namespace, "second"), 60, "the new leader to reconcile")
        assert f"applied RayJob {namespace}/second-1" in procs[standby].log_tail(100_000)
        # Released on SIGTERM: the standby's next retry (2 s) takes it. Killed: the 15 s term runs out.
        assert took < (6 if how == "stopped" else 25), f"takeover took {took:.1f}s"
    finally:
        for proc in procs.values():
            proc.stop()
