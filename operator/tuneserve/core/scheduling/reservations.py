"""Capacity promised to placed objects whose worker pods are not bound yet (issue 15, burst
overcommit). The inventory counts only bound pods, so objects created together would all see the
same free pool; subtracting what earlier placements promised makes the next placement see what
is really left. One logic for both kinds: each kind turns its recorded placement into a
``Reservation``, this module knows neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Iterable, Mapping, Optional

from tuneserve.core.catalog import Catalog
from tuneserve.core.scheduling.inventory import TERMINATED_POD_PHASES, Inventory, build_inventory, parse_quantity

# (kind, namespace, name) of the object that holds a reservation.
OwnerKey = tuple[str, str, str]

WORKER_NODE_TYPE = ("ray.io/node-type", "worker")   # the label KubeRay puts on worker pods


@dataclass(frozen=True)
class Reservation:
    """What one placed object's recorded placement promises: ``workers`` worker pods of
    ``profile_key`` with ``devices_per_worker`` each, in ``pool``, until those pods are bound.
    ``pod_labels`` select its worker pods in ``owner``'s namespace (for a FineTuneJob, those of
    the recorded attempt only)."""
    owner: OwnerKey
    pool: str
    profile_key: str
    workers: int
    devices_per_worker: int
    pod_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.owner[1]


def live_placement(body: Mapping[str, Any], idle_phases: frozenset[str]) -> Optional[dict[str, Any]]:
    """The recorded status.placement of an object that holds capacity, for either kind: placed,
    not in one of the kind's ``idle_phases`` (finished, failed, suspended: its pods are gone or
    going) and not refused (Accepted=False: an object blocked on a missing Secret or claim renders
    no pods, and must not hold a pool while it waits). None otherwise."""
    status = body.get("status") or {}
    placement = status.get("placement")
    if not placement or status.get("phase") in idle_phases:
        return None
    refused = any(c.get("type") == "Accepted" and c.get("status") == "False" for c in status.get("conditions") or [])
    return None if refused else dict(placement)


def _bound_worker_counts(pods: Iterable[Mapping[str, Any]],
                         selectors: set[tuple[str, ...]]) -> dict[tuple[Any, ...], int]:
    """Bound, live worker pods counted per (label keys, namespace, label values), for every set of
    label keys the reservations select on: one pass over the pods, not one per reservation."""
    counts: dict[tuple[Any, ...], int] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(WORKER_NODE_TYPE[0]) != WORKER_NODE_TYPE[1] or not (pod.get("spec") or {}).get("nodeName"):
            continue
        if (pod.get("status") or {}).get("phase") in TERMINATED_POD_PHASES:
            continue
        for keys in selectors:
            if all(k in labels for k in keys):
                slot = (keys, meta.get("namespace") or "default", tuple(labels[k] for k in keys))
                counts[slot] = counts.get(slot, 0) + 1
    return counts


def pending_workers(reservations: Iterable[Reservation], pods: Iterable[Mapping[str, Any]]) -> dict[OwnerKey, int]:
    """Per owner, the promised workers whose pods are not bound yet: max(0, promised - bound), so
    capacity is never counted twice (bound pods are already in the inventory)."""
    reservations = list(reservations)
    selectors = {tuple(sorted(r.pod_labels)) for r in reservations}
    counts = _bound_worker_counts(pods, selectors)
    out = {}
    for r in reservations:
        keys = tuple(sorted(r.pod_labels))
        bound = counts.get((keys, r.namespace, tuple(r.pod_labels[k] for k in keys)), 0)
        out[r.owner] = max(0, r.workers - bound)
    return out


def _worker_request(reservation: Reservation, catalog: Catalog) -> Optional[dict[str, Decimal]]:
    """Requests of one worker pod of the reservation, as the builders render them (None: the
    catalog no longer knows the accelerator; nothing can be reserved for it)."""
    try:
        profile = catalog.get(reservation.profile_key)
    except KeyError:
        return None
    return {k: parse_quantity(v) for k, v in profile.worker_resources(reservation.devices_per_worker).items()}


def _take_first_fit(free: list[dict[str, Decimal]], members: list[int], request: Mapping[str, Decimal]) -> bool:
    """Take ``request`` from the first node (of ``members``) that has room for it, as the
    scheduler would bind the worker; False when none has (the pool is already full)."""
    for i in members:
        if all(free[i].get(k, Decimal(0)) >= q for k, q in request.items()):
            for k, q in request.items():
                free[i][k] = free[i][k] - q
            return True
    return False


def reserve(inventory: Inventory, reservations: Iterable[Reservation], pods: Iterable[Mapping[str, Any]],
            catalog: Catalog, planning: Optional[OwnerKey] = None) -> Inventory:
    """The inventory less what other placed objects were promised and do not hold yet: each
    pending worker takes its requests from the first node of its pool with room. ``planning``:
    the object being placed, whose own reservation never counts against itself. The devices
    taken per pool are recorded (``Inventory.reserved``) for the placement messages."""
    others = sorted((r for r in reservations if r.owner != planning), key=lambda r: r.owner)
    pending = pending_workers(others, pods)
    free = [dict(n.free) for n in inventory.nodes]
    pools: dict[str, list[int]] = {}
    for i, node in enumerate(inventory.nodes):
        if node.schedulable:
            pools.setdefault(node.pool, []).append(i)
    reserved: dict[str, int] = dict(inventory.reserved)
    requests: dict[tuple[str, int], Optional[dict[str, Decimal]]] = {}
    full: set[tuple[str, str, int]] = set()   # (pool, accelerator, devices): no room left, free only shrinks
    for r in others:
        members, count, shape = pools.get(r.pool), pending.get(r.owner, 0), (r.profile_key, r.devices_per_worker)
        if not members or not count or (r.pool, *shape) in full:
            continue
        if shape not in requests:
            requests[shape] = _worker_request(r, catalog)
        request = requests[shape]
        if request is None:
            continue
        for _ in range(count):
            if not _take_first_fit(free, members, request):
                full.add((r.pool, *shape))
                break
            reserved[r.pool] = reserved.get(r.pool, 0) + r.devices_per_worker
    nodes = tuple(replace(n, free=f) if f != n.free else n for n, f in zip(inventory.nodes, free))
    return Inventory(nodes, reserved)


def placement_inventory(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
                        reservations: Iterable[Reservation], catalog: Catalog, planning: OwnerKey) -> Inventory:
    """What placement decides on, for either kind: bound pods' usage and other objects'
    reservations subtracted."""
    pods = list(pods)
    return reserve(build_inventory(nodes, pods), reservations, pods, catalog, planning)

