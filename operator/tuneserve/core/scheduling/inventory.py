"""A point-in-time snapshot of schedulable capacity, built from Node and Pod objects.

Placement is a pure function of this snapshot, so the operator lists Nodes and Pods (informer
caches) and calls ``build_inventory``; tests build snapshots by hand.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Mapping, Optional

POOL_LABEL = "tuneserve.dev/pool"
DEFAULT_POOL = "default"

_SUFFIXES = {
    "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity ("8", "500m", "16Gi", "1e3") as a Decimal in base units."""
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    return Decimal(match.group(1)) * Decimal(_SUFFIXES[match.group(2) or ""])


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class NodeSnapshot:
    """One node: its labels and taints, and per resource what is allocatable and still free."""
    name: str
    labels: Mapping[str, str]
    taints: tuple[Taint, ...] = ()
    allocatable: Mapping[str, Decimal] = field(default_factory=dict)
    free: Mapping[str, Decimal] = field(default_factory=dict)
    schedulable: bool = True

    @property
    def pool(self) -> str:
        return self.labels.get(POOL_LABEL, DEFAULT_POOL)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeSnapshot, ...]
    # Devices per pool already taken out of ``free`` for placed objects whose pods are not bound
    # yet (reservations.reserve); placement messages name them.
    reserved: Mapping[str, int] = field(default_factory=dict)


TERMINATED_POD_PHASES = frozenset({"Succeeded", "Failed"})   # their requests no longer hold a node


def pod_requests(pod: Mapping[str, Any]) -> dict[str, Decimal]:
    """Effective requests of a pod as the scheduler counts them: max(sum of containers, any init
    container) per resource, plus pod overhead. Limits stand in for missing requests."""
    spec = pod.get("spec") or {}

    def container_requests(container: Mapping[str, Any]) -> dict[str, Decimal]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {k: parse_quantity(v) for k, v in merged.items()}

    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or []:
        for k, v in container_requests(container).items():
            total[k] = total.get(k, Decimal(0)) + v
    for container in spec.get("initContainers") or []:
        for k, v in container_requests(container).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    for k, v in (spec.get("overhead") or {}).items():
        total[k] = total.get(k, Decimal(0)) + parse_quantity(v)
    return total


def _node_ready(node: Mapping[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return True  # no conditions reported (e.g. a bare test object): assume ready


def node_offer(node: Mapping[str, Any]) -> str:
    """What placement reads of a node (labels, allocatable, taints, cordon, readiness), as one
    comparable string: its change, not a heartbeat, can make a waiting object fit."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    return json.dumps([meta.get("labels") or {}, status.get("allocatable") or {}, spec.get("taints") or [],
                       bool(spec.get("unschedulable")), _node_ready(node)], sort_keys=True)


def build_inventory(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> Inventory:
    """Snapshot from Node and Pod dicts (as the API returns them). Free = allocatable minus the
    requests of bound, non-terminated pods. Cordoned or NotReady nodes are kept but marked
    unschedulable, so placement can tell "busy" from "absent"."""
    used: dict[str, dict[str, Decimal]] = {}
    for pod in pods:
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name or (pod.get("status") or {}).get("phase") in TERMINATED_POD_PHASES:
            continue
        bucket = used.setdefault(node_name, {})
        for k, v in pod_requests(pod).items():
            bucket[k] = bucket.get(k, Decimal(0)) + v
    snapshots = []
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        meta, spec, status = node["metadata"], node.get("spec") or {}, node.get("status") or {}
        allocatable = {k: parse_quantity(v) for k, v in (status.get("allocatable") or {}).items()}
        node_used = used.get(meta["name"], {})
        free = {k: max(Decimal(0), v - node_used.get(k, Decimal(0))) for k, v in allocatable.items()}
        taints = tuple(Taint(t["key"], t.get("value") or "", t.get("effect") or "NoSchedule") for t in spec.get("taints") or [])
        snapshots.append(NodeSnapshot(
            name=meta["name"], labels=dict(meta.get("labels") or {}), taints=taints,
            allocatable=allocatable, free=free,
            schedulable=not spec.get("unschedulable", False) and _node_ready(node),
        ))
    return Inventory(tuple(snapshots))


def tolerates(tolerations: Iterable[Mapping[str, Optional[str]]], taint: Taint) -> bool:
    """Kubernetes toleration matching (PreferNoSchedule taints never block)."""
    if taint.effect == "PreferNoSchedule":
        return True
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.effect:
            continue
        operator = tol.get("operator") or "Equal"
        if not tol.get("key"):
            if operator == "Exists":
                return True
            continue
        if tol["key"] != taint.key:
            continue
        if operator == "Exists" or (tol.get("value") or "") == taint.value:
            return True
    return False
