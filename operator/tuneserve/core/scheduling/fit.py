"""Does a candidate fit the cluster: node matching (labels, taints, resources) and free versus
idle capacity per pool. Shared by both kinds' placement; typed on the pod options both specs
inherit (``api.workload.RayPodOptions``), so it knows neither kind."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, Mapping, Optional

from tuneserve.api.conditions import RejectionCode
from tuneserve.api.workload import RayPodOptions
from tuneserve.core.catalog import AcceleratorProfile
from tuneserve.core.scheduling.inventory import Inventory, NodeSnapshot, parse_quantity, tolerates
from tuneserve_workers.contract import DataParallel



@dataclass(frozen=True)
class Candidate:
    """A concrete choice: one catalog profile, with a worker layout."""
    profile: AcceleratorProfile
    devices_per_worker: int
    workers: int
    label: str  # "choice 2" or "auto"
    # How the ranks share the model (FineTuneJob sizing decides; ModelServe: unused).
    data_parallel: DataParallel = DataParallel.replicated
    # Gradient checkpointing as the sizing resolved it for this layout (FineTuneJob; ModelServe: unused).
    gradient_checkpointing: bool = True

    @property
    def key(self) -> str:
        return f"{self.profile.key} {self.workers}x{self.devices_per_worker}"

    @property
    def devices(self) -> int:
        return self.workers * self.devices_per_worker

    @property
    def world_size(self) -> int:
        """Training processes: one per device (``contract.AcceleratorRuntime.world_size``)."""
        return self.workers * max(1, self.devices_per_worker)

    @property
    def display(self) -> str:
        return f"{self.profile.display_name} x{self.devices}"


@dataclass(frozen=True)
class Rejection:
    choice: str
    code: RejectionCode
    message: str


class Outcome(str, Enum):
    Placed = "Placed"            # fits now
    Waiting = "Waiting"          # could fit; capacity busy
    Unplaceable = "Unplaceable"  # no choice can run


@dataclass(frozen=True)
class Fit:
    pool: Optional[str]
    fits_now: bool
    could_fit: bool
    message: str
    code: Optional[RejectionCode] = None


def user_tolerations(spec: RayPodOptions) -> list[dict[str, Any]]:
    return [t.to_wire() for t in spec.tolerations or []]


def pod_tolerations(profile: AcceleratorProfile, spec: RayPodOptions) -> list[dict[str, Any]]:
    """The accelerator's tolerations, then the user's (duplicates dropped)."""
    out: list[dict[str, Any]] = []
    for tol in [t.model_dump(exclude_none=True) for t in profile.tolerations] + user_tolerations(spec):
        if tol not in out:
            out.append(tol)
    return out


def node_matches(node: NodeSnapshot, profile: AcceleratorProfile, spec: RayPodOptions) -> bool:
    """Labels (catalog + user nodeSelector), label alternatives, taints, schedulability."""
    if not node.schedulable:
        return False
    wanted = {**profile.node_labels, **(spec.node_selector or {})}
    if any(node.labels.get(k) != v for k, v in wanted.items()):
        return False
    if any(node.labels.get(k) not in values for k, values in profile.node_labels_any_of.items()):
        return False
    if profile.resource_name and node.allocatable.get(profile.resource_name, Decimal(0)) <= 0:
        return False
    tolerations = pod_tolerations(profile, spec)
    return all(tolerates(tolerations, taint) for taint in node.taints if taint.effect in ("NoSchedule", "NoExecute"))


def _slots(amounts: Mapping[str, Decimal], request: Mapping[str, Decimal]) -> int:
    return min((int(amounts.get(r, Decimal(0)) // q) for r, q in request.items() if q > 0), default=0)


def _catalog_conflict(profile: AcceleratorProfile, selector: Mapping[str, str]) -> Optional[str]:
    """The first spec.nodeSelector label the catalog's node labels for ``profile`` contradict."""
    for key, value in sorted(selector.items()):
        wanted = profile.node_labels.get(key)
        if wanted is not None and wanted != value:
            return f"spec.nodeSelector {key}={value} contradicts the catalog's node label {key}={wanted}"
        any_of = profile.node_labels_any_of.get(key)
        if any_of is not None and value not in any_of:
            return f"spec.nodeSelector {key}={value} contradicts the catalog's node labels {key} in ({'|'.join(any_of)})"
    return None


def _pool_conflicts(nodes: list[NodeSnapshot], selector: Mapping[str, str]) -> str:
    """Per pool of ``nodes`` (none of which matches ``selector``), the label it contradicts."""
    pools: dict[str, list[NodeSnapshot]] = {}
    for node in nodes:
        pools.setdefault(node.pool, []).append(node)
    parts = []
    for pool, members in sorted(pools.items()):
        key, value = next(((k, v) for k, v in sorted(selector.items()) if all(n.labels.get(k) != v for n in members)),
                          sorted(selector.items())[0])
        have = "|".join(sorted({n.labels[key] for n in members if key in n.labels})) or "unset"
        parts.append(f"pool {pool} has {key}={have}")
    return ", ".join(parts)


def selector_conflict(profile: AcceleratorProfile, spec: RayPodOptions, inventory: Inventory) -> Optional[Fit]:
    """spec.nodeSelector against the chosen accelerator: a label the catalog contradicts (no node
    can ever match: Unsupported), or one that no pool holding the accelerator has (NoMatchingNodes);
    the choice is rejected with the label named. None when the selector is no obstacle."""
    selector = dict(spec.node_selector or {})
    if not selector:
        return None
    conflict = _catalog_conflict(profile, selector)
    if conflict:
        return Fit(None, False, False, conflict, RejectionCode.Unsupported)
    bare = spec.model_copy(update={"node_selector": None})
    nodes = [n for n in inventory.nodes if node_matches(n, profile, bare)]
    if not nodes or any(node_matches(n, profile, spec) for n in nodes):
        return None
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
    return Fit(None, False, False, f"spec.nodeSelector {wanted} matches no node that has {profile.display_name} "
                                   f"({_pool_conflicts(nodes, selector)})", RejectionCode.NoMatchingNodes)


def _reserved_note(inventory: Inventory, pool: str) -> str:
    """Why a pool with idle devices is busy when placed objects' pods are not bound yet."""
    devices = inventory.reserved.get(pool, 0)
    return f", {devices} devices reserved by placed jobs not yet running" if devices else ""


def fit_candidate(candidate: Candidate, spec: RayPodOptions, inventory: Inventory) -> Fit:
    profile = candidate.profile
    conflict = selector_conflict(profile, spec, inventory)
    if conflict is not None:
        return conflict
    request = {k: parse_quantity(v) for k, v in profile.worker_resources(candidate.devices_per_worker).items()}
    device_resource = profile.resource_name or "cpu"
    need = f"needs {candidate.workers} worker{'s' if candidate.workers > 1 else ''} x {request[device_resource]} {device_resource}"
    nodes = [n for n in inventory.nodes if node_matches(n, profile, spec)]
    if not nodes:
        where = ", ".join([f"{k}={v}" for k, v in {**profile.node_labels, **(spec.node_selector or {})}.items()]
                          + [f"{k} in ({'|'.join(v)})" for k, v in profile.node_labels_any_of.items()])
        return Fit(None, False, False, f"no schedulable node has {profile.display_name}"
                    + (f" (labels {where}" + (f", resource {profile.resource_name})" if profile.resource_name else ")") if where else ""),
                    RejectionCode.NoMatchingNodes)
    pools: dict[str, list[NodeSnapshot]] = {}
    for node in nodes:
        pools.setdefault(node.pool, []).append(node)
    busy_parts, could_pool = [], None
    for pool in sorted(pools):
        members = pools[pool]
        free_slots = sum(_slots(n.free, request) for n in members)
        idle_slots = sum(_slots(n.allocatable, request) for n in members)
        if free_slots >= candidate.workers:
            return Fit(pool, True, True, f"{need}; pool {pool} has room for {free_slots}")
        free_devices = [int(n.free.get(device_resource, 0)) for n in members]
        prefix = f"pool {pool}: " if len(pools) > 1 else ""
        busy_parts.append(f"{prefix}free per node: {free_devices}{_reserved_note(inventory, pool)}")
        if idle_slots >= candidate.workers and could_pool is None:
            could_pool = pool
    detail = "; ".join(busy_parts)
    if could_pool is not None:
        return Fit(could_pool, False, True, f"{need}, {detail}", RejectionCode.Busy)
    alloc = [int(n.allocatable.get(device_resource, 0)) for n in nodes]
    return Fit(None, False, False, f"{need}, but even idle the matching nodes hold fewer (allocatable per node: {alloc})",
                RejectionCode.InsufficientCapacity)

