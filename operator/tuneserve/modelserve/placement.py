"""Placement of a ModelServe: which accelerator choice, how many devices per replica, which pool.

The FineTuneJob rules, reused (``tuneserve.finetunejob.placement``): choices in the user's order; unknown
accelerators, missing nodes and too little capacity are rejected with the same messages; the
first choice that fits now wins, else the first that could fit waits. Serving adds two checks:
the vendor must support the requested quantization (catalog ``servingQuantizations``) and one
replica must hold the weights + LoRA slots + one maxModelLen sequence of KV cache on
tensorParallelSize devices (automatic when unset: ``sizing.auto_tensor_parallel_size``). A
replica is one Ray worker pod with tensorParallelSize devices; "fits now" means
max(replicas.min, 1) such pods fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.modelserve import ModelServeSpec, Quantization, ReplicaConfig
from tuneserve.api.modelserve_status import ServePhase, ServePlacementStatus
from tuneserve.builders.common import SERVE_LABEL
from tuneserve.api.conditions import RejectionCode
from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.scheduling.inventory import Inventory
from tuneserve.core.scheduling.reservations import OwnerKey, Reservation, live_placement
from tuneserve.core.scheduling.fit import Candidate, Outcome, Rejection, fit_candidate, node_matches
from tuneserve.core.sizing.model import ModelShape, model_shape
from tuneserve.core.sizing.serving import (
    ServingMemoryEstimate, auto_tensor_parallel_size, estimate_serving_memory, serving_shortfall,
)

DEFAULT_MAX_DEVICES_PER_NODE = 8


@dataclass(frozen=True)
class ServePlacementDecision:
    outcome: Outcome
    reason: str
    rejections: tuple[Rejection, ...] = ()
    candidate: Optional[Candidate] = None   # devices_per_worker = tensorParallelSize, workers = replicas to fit
    pool: Optional[str] = None
    shape: Optional[ModelShape] = None
    memory: Optional[ServingMemoryEstimate] = None
    tensor_parallel_auto: bool = False

    @property
    def tensor_parallel_size(self) -> Optional[int]:
        return self.candidate.devices_per_worker if self.candidate else None


def _max_devices_per_node(profile: AcceleratorProfile, spec: ModelServeSpec, inventory: Inventory) -> int:
    """Largest device count one matching node offers (a replica lives on one node)."""
    resource = profile.resource_name or "cpu"
    counts = [int(n.allocatable.get(resource, Decimal(0))) for n in inventory.nodes if node_matches(n, profile, spec)]
    return max(counts) if counts else DEFAULT_MAX_DEVICES_PER_NODE


def quantization_rejection(spec: ModelServeSpec, profile: AcceleratorProfile, label: str, key: str) -> Optional[Rejection]:
    quant = spec.engine.quantization
    if quant == Quantization.none or quant.value in profile.serving_quantizations:
        return None
    supported = ", ".join(profile.serving_quantizations) or "none"
    return Rejection(key, RejectionCode.Unsupported,
                     f"{label}: {profile.display_name} does not support {quant.value} quantization for serving (supports: {supported})")


def _replica_memory(spec: ModelServeSpec, shape: ModelShape, profile: AcceleratorProfile, catalog: Catalog,
                    inventory: Inventory) -> tuple[Optional[ServingMemoryEstimate], Optional[str], bool]:
    """(memory of one replica, why it does not fit, tensorParallelSize chosen automatically)."""
    if spec.engine.tensor_parallel_size:
        memory = estimate_serving_memory(shape, spec.engine, profile, catalog, spec.engine.tensor_parallel_size)
        utilization = profile.memory_utilization(spec.engine.gpu_memory_utilization)
        return memory, serving_shortfall(shape, memory, profile, utilization), False
    found, why = auto_tensor_parallel_size(shape, spec.engine, profile, catalog,
                                           _max_devices_per_node(profile, spec, inventory))
    return found, (None if found else why), True


def _placed_reason(label: str, profile: AcceleratorProfile, memory: ServingMemoryEstimate, pool: Optional[str],
                   rejected: int) -> str:
    reason = (f"{label}: {profile.display_name} x{memory.tensor_parallel_size} per replica fits now in pool {pool} "
              f"(needs {memory.total_gib:.1f} of {memory.budget_gib:.1f} GiB per device; "
              f"KV cache room ~{memory.kv_room_tokens} tokens per replica)")
    if rejected:
        reason += f"; {rejected} earlier choice{'s' if rejected > 1 else ''} rejected"
    return reason


def decide_serve_placement(spec: ModelServeSpec, catalog: Catalog, inventory: Inventory,
                           timed_out: Optional[Mapping[str, str]] = None) -> ServePlacementDecision:
    """Pick the first acceptable choice that fits now (else the first that could, waiting).

    ``timed_out`` maps candidate keys that left pods unschedulable past the timeout to the
    recorded reason; they are skipped. Raises ``sizing.ModelSizeUnknown`` when the model size
    cannot be derived.
    """
    timed_out = timed_out or {}
    shape = model_shape(spec.base_model)
    replicas_to_fit = max(spec.replicas.min, 1)
    rejections: list[Rejection] = []
    waiting: Optional[tuple[Candidate, str, ServingMemoryEstimate, Optional[str]]] = None
    seen: set[str] = set()
    for index, choice in enumerate(spec.accelerators.choices):
        label = f"choice {index + 1}"
        profiles = catalog.find(choice.vendor, choice.product)
        if not profiles:
            known = ", ".join(p.key for p in catalog.profiles)
            rejections.append(Rejection(choice.label(), RejectionCode.UnknownAccelerator,
                                        f"{label}: no accelerator {choice.label()} in the catalog (known: {known})"))
            continue
        for profile in profiles:
            if profile.key in seen:
                continue
            seen.add(profile.key)
            rejection = quantization_rejection(spec, profile, label, profile.key)
            if rejection:
                rejections.append(rejection)
                continue
            memory, shortfall, auto = _replica_memory(spec, shape, profile, catalog, inventory)
            if shortfall or memory is None:
                rejections.append(Rejection(profile.key, RejectionCode.InsufficientMemory, f"{label}: {shortfall}"))
                continue
            candidate = Candidate(profile, memory.tensor_parallel_size, replicas_to_fit, label)
            if candidate.key in timed_out:
                rejections.append(Rejection(candidate.key, RejectionCode.TimedOut, timed_out[candidate.key]))
                continue
            fit = fit_candidate(candidate, spec, inventory)
            if fit.fits_now:
                reason = _placed_reason(label, profile, memory, fit.pool, len(rejections))
                return ServePlacementDecision(Outcome.Placed, reason, tuple(rejections), candidate, fit.pool, shape, memory, auto)
            rejections.append(Rejection(candidate.key, fit.code or RejectionCode.Busy, f"{label}: {profile.display_name}: {fit.message}"))
            if fit.could_fit and waiting is None:
                waiting = (candidate, fit.message, memory, fit.pool)
    if waiting is not None:
        candidate, message, memory, pool = waiting
        reason = (f"{candidate.label}: {candidate.profile.display_name} x{candidate.devices_per_worker} per replica can hold the model "
                  f"({memory.total_gib:.1f} GiB per device) but is busy; waiting for capacity in pool {pool} ({message})")
        return ServePlacementDecision(Outcome.Waiting, reason, tuple(r for r in rejections if r.choice != candidate.key),
                                      candidate, pool, shape, memory, not spec.engine.tensor_parallel_size)
    return ServePlacementDecision(Outcome.Unplaceable,
                                  "no accelerator choice can serve this model: " + "; ".join(r.message for r in rejections),
                                  tuple(rejections), shape=shape)


def serve_candidate(profile: AcceleratorProfile, tensor_parallel_size: int, replicas_min: int) -> Candidate:
    """Rebuild the candidate of a recorded placement (e.g. after an operator restart)."""
    return Candidate(profile, tensor_parallel_size, max(replicas_min, 1), "recorded placement")


_RESERVE_NOTHING = frozenset({ServePhase.Failed.value})   # a Failed ModelServe's replicas are not wanted


def serve_owner(namespace: str, name: str) -> OwnerKey:
    """Who holds a reservation: matched against the object being placed, so it never blocks itself."""
    return ("ModelServe", namespace, name)


def serve_reservation(body: Mapping[str, Any]) -> Optional[Reservation]:
    """What a ModelServe's recorded placement holds on its pool until its replicas' worker pods
    are bound: max(replicas.min, 1) replicas of tensorParallelSize devices, as placement fitted
    them (``live_placement`` says when it holds none); None also when its status or replicas
    do not parse."""
    raw = live_placement(body, _RESERVE_NOTHING)
    try:
        placement = ServePlacementStatus.model_validate(raw) if raw else None
        replicas = ReplicaConfig.model_validate(dict((body.get("spec") or {}).get("replicas") or {}))
    except ValidationError:
        return None
    if placement is None or not placement.pool:
        return None
    meta = body["metadata"]
    return Reservation(serve_owner(meta.get("namespace") or "default", meta["name"]), placement.pool,
                       f"{placement.vendor}/{placement.product}", max(replicas.min, 1), placement.tensor_parallel_size,
                       {SERVE_LABEL: meta["name"]})
