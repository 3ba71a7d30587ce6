"""Placement: which accelerator choice, which pool, and why — a pure function of the spec, the
catalog, an inventory snapshot and the history of choices that timed out.

Rules: choices are tried in the user's order (for ``auto``: cheapest estimated cost per token
first). A choice is rejected when the catalog does not know it, it cannot run the method (QLoRA
without 4-bit support), it cannot hold the model (with the arithmetic), no node has it, or even
an idle cluster lacks the capacity. The first remaining choice that fits *now* wins. When none
fits now but some could (capacity exists, busy), the first of those is chosen and the job waits.
Moving on after pods stay unschedulable is decided by ``fallback_verdict``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Iterable, Mapping, Optional

from tuneserve.api.finetunejob import AcceleratorChoice, FineTuneJobSpec, Method
from tuneserve.api.status import PlacementStatus, RejectionCode
from tuneserve.catalog import AcceleratorProfile, Catalog
from tuneserve.inventory import Inventory, NodeSnapshot, parse_quantity, tolerates
from tuneserve.sizing import (
    MemoryEstimate, MemoryPlan, ModelShape, RunEstimate, estimate_run, format_duration, memory_choice,
    memory_shortfall, model_shape, plan_memory,
)
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
class PlacementDecision:
    outcome: Outcome
    reason: str
    rejections: tuple[Rejection, ...] = ()
    candidate: Optional[Candidate] = None
    pool: Optional[str] = None
    shape: Optional[ModelShape] = None
    memory: Optional[MemoryEstimate] = None   # the chosen arithmetic (replicated or sharded)
    run: Optional[RunEstimate] = None


@dataclass(frozen=True)
class _Fit:
    pool: Optional[str]
    fits_now: bool
    could_fit: bool
    message: str
    code: Optional[RejectionCode] = None


def user_tolerations(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    return [t.to_wire() for t in spec.tolerations or []]


def pod_tolerations(profile: AcceleratorProfile, spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The accelerator's tolerations, then the user's (duplicates dropped)."""
    out: list[dict[str, Any]] = []
    for tol in [t.model_dump(exclude_none=True) for t in profile.tolerations] + user_tolerations(spec):
        if tol not in out:
            out.append(tol)
    return out


def node_matches(node: NodeSnapshot, profile: AcceleratorProfile, spec: FineTuneJobSpec) -> bool:
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


def _fit(candidate: Candidate, spec: FineTuneJobSpec, inventory: Inventory) -> _Fit:
    profile = candidate.profile
    request = {k: parse_quantity(v) for k, v in profile.worker_resources(candidate.devices_per_worker).items()}
    device_resource = profile.resource_name or "cpu"
    need = f"needs {candidate.workers} worker{'s' if candidate.workers > 1 else ''} x {request[device_resource]} {device_resource}"
    nodes = [n for n in inventory.nodes if node_matches(n, profile, spec)]
    if not nodes:
        where = ", ".join([f"{k}={v}" for k, v in {**profile.node_labels, **(spec.node_selector or {})}.items()]
                          + [f"{k} in ({'|'.join(v)})" for k, v in profile.node_labels_any_of.items()])
        return _Fit(None, False, False, f"no schedulable node has {profile.display_name}"
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
            return _Fit(pool, True, True, f"{need}; pool {pool} has room for {free_slots}")
        free_devices = [int(n.free.get(device_resource, 0)) for n in members]
        prefix = f"pool {pool}: " if len(pools) > 1 else ""
        busy_parts.append(f"{prefix}free per node: {free_devices}")
        if idle_slots >= candidate.workers and could_pool is None:
            could_pool = pool
    detail = "; ".join(busy_parts)
    if could_pool is not None:
        return _Fit(could_pool, False, True, f"{need}, {detail}", RejectionCode.Busy)
    alloc = [int(n.allocatable.get(device_resource, 0)) for n in nodes]
    return _Fit(None, False, False, f"{need}, but even idle the matching nodes hold fewer (allocatable per node: {alloc})",
                RejectionCode.InsufficientCapacity)


def _choice_candidates(choice: AcceleratorChoice, index: int, catalog: Catalog) -> tuple[list[Candidate], Optional[Rejection]]:
    profiles = catalog.find(choice.vendor, choice.product)
    label = f"choice {index + 1}"
    if not profiles:
        name = f"{choice.vendor or '*'}/{choice.product or '*'}"
        known = ", ".join(p.key for p in catalog.profiles)
        return [], Rejection(name, RejectionCode.UnknownAccelerator,
                             f"{label}: no accelerator {name} in the catalog (known: {known})")
    return [Candidate(p, choice.devices_per_worker, choice.workers, label) for p in profiles], None


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


def _auto_candidates(spec: FineTuneJobSpec, catalog: Catalog, shape: ModelShape,
                     inventory: Inventory) -> tuple[list[Candidate], list[Rejection]]:
    """Every catalog accelerator allowed by the request, laid out on the largest node that has it,
    ordered by estimated cost per token (catalog order breaks ties)."""
    auto = spec.accelerators.auto
    assert auto is not None
    candidates, rejections = [], []
    for order, profile in enumerate(catalog.profiles):
        allowed = profile.vendor in auto.vendors if auto.vendors else profile.resource_name is not None
        if not allowed:
            continue
        if auto.min_memory_gib_per_device and profile.memory_gib < auto.min_memory_gib_per_device:
            rejections.append(Rejection(profile.key, RejectionCode.Excluded,
                                        f"{profile.display_name} has {profile.memory_gib:g} GiB per device, below minMemoryGiBPerDevice {auto.min_memory_gib_per_device}"))
            continue
        per_node = [int(n.allocatable.get(profile.resource_name, 0)) if profile.resource_name else int(n.allocatable.get("cpu", 0))
                    for n in inventory.nodes if node_matches(n, profile, spec)]
        if not per_node or max(per_node) == 0:
            rejections.append(Rejection(profile.key, RejectionCode.NoMatchingNodes, f"no schedulable node has {profile.display_name}"))
            continue
        per_worker = _largest_divisor_at_most(auto.devices, max(per_node))
        run = estimate_run(shape, spec, profile, catalog, 1)
        cost_per_token = profile.price_per_device_hour / max(run.tokens_per_second, 1e-9)
        candidates.append((cost_per_token, order, Candidate(profile, per_worker, auto.devices // per_worker, "auto")))
    return [c for _, _, c in sorted(candidates, key=lambda t: (t[0], t[1]))], rejections


def decide_placement(spec: FineTuneJobSpec, catalog: Catalog, inventory: Inventory,
                     timed_out: Optional[Mapping[str, str]] = None) -> PlacementDecision:
    """Pick the first acceptable choice that fits now (else the first that could, waiting).

    ``timed_out`` maps candidate keys (``Candidate.key``) that were tried and left pods
    unschedulable past the timeout to the recorded reason; they are skipped.
    Raises ``sizing.ModelSizeUnknown`` when the model size cannot be derived.
    """
    timed_out = timed_out or {}
    shape = model_shape(spec.base_model)
    rejections: list[Rejection] = []
    if spec.accelerators.choices is not None:
        candidates = []
        for index, choice in enumerate(spec.accelerators.choices):
            found, rejection = _choice_candidates(choice, index, catalog)
            candidates += found
            if rejection:
                rejections.append(rejection)
    else:
        candidates, rejections = _auto_candidates(spec, catalog, shape, inventory)

    waiting: Optional[tuple[Candidate, _Fit, MemoryPlan]] = None
    for candidate in candidates:
        profile = candidate.profile
        if candidate.key in timed_out:
            rejections.append(Rejection(candidate.key, RejectionCode.TimedOut, timed_out[candidate.key]))
            continue
        if spec.method == Method.qlora and not profile.supports_4bit:
            rejections.append(Rejection(candidate.key, RejectionCode.Unsupported,
                                        f"{candidate.label}: {profile.display_name} does not support 4-bit (QLoRA) base weights"))
            continue
        plan = plan_memory(shape, spec, profile, catalog, candidate.workers, candidate.devices_per_worker)
        shortfall = memory_shortfall(shape, plan, profile, candidate.devices_per_worker)
        if shortfall:
            rejections.append(Rejection(candidate.key, RejectionCode.InsufficientMemory, f"{candidate.label}: {shortfall}"))
            continue
        candidate = replace(candidate, data_parallel=plan.data_parallel)
        fit = _fit(candidate, spec, inventory)
        if fit.fits_now:
            run = estimate_run(shape, spec, profile, catalog, candidate.devices)
            reason = _placed_reason(candidate, fit, plan, run, rejections)
            return PlacementDecision(Outcome.Placed, reason, tuple(rejections), candidate, fit.pool, shape, plan.chosen, run)
        rejections.append(Rejection(candidate.key, fit.code or RejectionCode.Busy, f"{candidate.label}: {profile.display_name}: {fit.message}"))
        if fit.could_fit and waiting is None:
            waiting = (candidate, fit, plan)

    if waiting is not None:
        candidate, fit, plan = waiting
        run = estimate_run(shape, spec, candidate.profile, catalog, candidate.devices)
        reason = (f"{candidate.label}: {candidate.display} can hold the model ({memory_choice(plan)}) "
                  f"but is busy; waiting for capacity in pool {fit.pool} ({fit.message})")
        return PlacementDecision(Outcome.Waiting, reason, tuple(r for r in rejections if r.choice != candidate.key),
                                 candidate, fit.pool, shape, plan.chosen, run)
    return PlacementDecision(Outcome.Unplaceable,
                             "no accelerator choice can run this job: " + "; ".join(r.message for r in rejections),
                             tuple(rejections), shape=shape)


def _placed_reason(candidate: Candidate, fit: _Fit, plan: MemoryPlan, run: RunEstimate,
                   rejections: list[Rejection]) -> str:
    parts = [f"{candidate.label}: {candidate.display} fits now in pool {fit.pool}, {memory_choice(plan)}"]
    if run.duration_seconds is not None and run.cost_usd is not None:
        parts.append(f"est. {format_duration(run.duration_seconds)}, ${run.cost_usd:,.2f}")
    if rejections:
        parts.append(f"{len(rejections)} earlier choice{'s' if len(rejections) > 1 else ''} rejected")
    return "; ".join(parts)


@dataclass(frozen=True)
class FallbackVerdict:
    move_on: bool
    reason: Optional[str] = None
    deadline: Optional[datetime] = None


def fallback_verdict(candidate_key: str, unschedulable_since: Optional[datetime], timeout: timedelta,
                     now: datetime) -> FallbackVerdict:
    """Whether to give up on a placed choice whose pods have been unschedulable since
    ``unschedulable_since`` (None: all pods scheduled). The reason is recorded in the history
    (status.rejectedChoices, code TimedOut) and passed back to ``decide_placement``."""
    if unschedulable_since is None:
        return FallbackVerdict(False)
    deadline = unschedulable_since + timeout
    if now < deadline:
        return FallbackVerdict(False, deadline=deadline)
    waited = format_duration((now - unschedulable_since).total_seconds())
    return FallbackVerdict(True, f"{candidate_key}: pods unschedulable for {waited} "
                                 f"(since {unschedulable_since.isoformat()}, timeout {format_duration(timeout.total_seconds())}); "
                                 "moved on to the next choice", deadline)


def unschedulable_since(pods: Iterable[Mapping[str, Any]]) -> Optional[datetime]:
    """Earliest time any pending pod was marked unschedulable (PodScheduled=False,
    reason Unschedulable); None when no pod is unschedulable now."""
    times = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "Pending"):
            continue
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                stamp = cond.get("lastTransitionTime")
                if isinstance(stamp, str):
                    stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                if stamp is not None:
                    times.append(stamp)
    return min(times) if times else None


def candidate_from_status(placement: PlacementStatus, catalog: Catalog) -> Candidate:
    """Rebuild the candidate of a recorded placement (e.g. after an operator restart), so the
    children render exactly as when they were created."""
    profile = catalog.get(f"{placement.vendor}/{placement.product}")
    return Candidate(profile, placement.devices_per_worker, placement.workers, "recorded placement",
                     placement.data_parallel)
