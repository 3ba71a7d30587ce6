"""Placement: which accelerator choice, which pool, and why — a pure function of the spec, the
catalog, an inventory snapshot and the history of choices that timed out.

Rules: choices are tried in the user's order (for ``auto``: cheapest estimated cost per token
first). A choice is rejected when the catalog does not know it, it cannot run the method (QLoRA
without 4-bit support, an FP8 base without FP8 matmuls; ``auto`` skips those), it cannot hold the
model (with the arithmetic), no node has it, or even an idle cluster lacks the capacity. The
first remaining choice that fits *now* wins. When none fits now but some could (capacity exists,
busy), the first of those is chosen and the job waits. The sizing also resolves gradient
checkpointing for the placement; the candidate carries it (and ``status.placement`` records it).
Moving on after pods stay unschedulable is decided by ``fallback_verdict``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.finetunejob import AcceleratorChoice, FineTuneJobSpec
from tuneserve.api.conditions import RejectionCode
from tuneserve.api.finetunejob_status import TERMINAL_PHASES, Phase, PlacementStatus
from tuneserve.builders.common import ATTEMPT_LABEL, JOB_LABEL
from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.scheduling.fit import (
    Candidate, Fit, Outcome, Rejection, fit_candidate, node_matches, selector_conflict,
)
from tuneserve.core.scheduling.inventory import Inventory
from tuneserve.core.scheduling.reservations import OwnerKey, Reservation, live_placement
from tuneserve.core.sizing.model import ModelShape, format_duration, model_shape
from tuneserve.core.sizing.training import (
    MemoryEstimate, MemoryPlan, RunEstimate, estimate_run, memory_choice, memory_shortfall, plan_memory,
)
from tuneserve_workers.contract import BasePrecision, Method


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


def _choice_candidates(choice: AcceleratorChoice, index: int, catalog: Catalog) -> tuple[list[Candidate], Optional[Rejection]]:
    profiles = catalog.find(choice.vendor, choice.product)
    label = f"choice {index + 1}"
    if not profiles:
        name = f"{choice.vendor or '*'}/{choice.product or '*'}"
        known = ", ".join(p.key for p in catalog.profiles)
        return [], Rejection(name, RejectionCode.UnknownAccelerator,
                             f"{label}: no accelerator {name} in the catalog (known: {known})")
    return [Candidate(p, choice.devices_per_worker, choice.workers, label) for p in profiles], None


def _missing_capability(spec: FineTuneJobSpec, profile: AcceleratorProfile) -> Optional[str]:
    """What the spec needs that ``profile`` lacks (by the catalog), naming the field; None: nothing."""
    if spec.method == Method.qlora and not profile.supports_4bit:
        return f"{profile.display_name} does not support 4-bit (QLoRA) base weights"
    if spec.training.base_precision == BasePrecision.fp8 and not profile.fp8:
        return (f"{profile.display_name} has no FP8 matmuls (catalog fp8: false), which training.basePrecision fp8 "
                "needs; unset training.basePrecision or choose an accelerator with fp8")
    return None


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
        missing = _missing_capability(spec, profile)
        if missing is not None:
            rejections.append(Rejection(profile.key, RejectionCode.Excluded, f"auto: skipped, {missing}"))
            continue
        conflict = selector_conflict(profile, spec, inventory)
        if conflict is not None and conflict.code is not None:
            rejections.append(Rejection(profile.key, conflict.code, f"auto: {profile.display_name}: {conflict.message}"))
            continue
        per_node = [int(n.allocatable.get(profile.resource_name, 0)) if profile.resource_name else int(n.allocatable.get("cpu", 0))
                    for n in inventory.nodes if node_matches(n, profile, spec)]
        if not per_node or max(per_node) == 0:
            rejections.append(Rejection(profile.key, RejectionCode.NoMatchingNodes, f"no schedulable node has {profile.display_name}"))
            continue
        per_worker = _largest_divisor_at_most(auto.devices, max(per_node))
        plan = plan_memory(shape, spec, profile, catalog, auto.devices // per_worker, per_worker)
        run = estimate_run(shape, spec, profile, catalog, 1, plan.gradient_checkpointing)
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
            candidates += [c for c in found if all(c.key != known.key for known in candidates)]   # once each
            if rejection:
                rejections.append(rejection)
    else:
        candidates, rejections = _auto_candidates(spec, catalog, shape, inventory)

    waiting: Optional[tuple[Candidate, Fit, MemoryPlan]] = None
    for candidate in candidates:
        profile = candidate.profile
        if candidate.key in timed_out:
            rejections.append(Rejection(candidate.key, RejectionCode.TimedOut, timed_out[candidate.key]))
            continue
        missing = _missing_capability(spec, profile)
        if missing is not None:
            rejections.append(Rejection(candidate.key, RejectionCode.Unsupported, f"{candidate.label}: {missing}"))
            continue
        plan = plan_memory(shape, spec, profile, catalog, candidate.workers, candidate.devices_per_worker)
        shortfall = memory_shortfall(shape, plan, profile, candidate.devices_per_worker)
        if shortfall:
            rejections.append(Rejection(candidate.key, RejectionCode.InsufficientMemory, f"{candidate.label}: {shortfall}"))
            continue
        candidate = replace(candidate, data_parallel=plan.data_parallel,
                            gradient_checkpointing=plan.gradient_checkpointing)
        fit = fit_candidate(candidate, spec, inventory)
        if fit.fits_now:
            run = estimate_run(shape, spec, profile, catalog, candidate.devices, candidate.gradient_checkpointing)
            reason = _placed_reason(candidate, fit, plan, run, rejections)
            return PlacementDecision(Outcome.Placed, reason, tuple(rejections), candidate, fit.pool, shape, plan.chosen, run)
        rejections.append(Rejection(candidate.key, fit.code or RejectionCode.Busy, f"{candidate.label}: {profile.display_name}: {fit.message}"))
        if fit.could_fit and waiting is None:
            waiting = (candidate, fit, plan)

    if waiting is not None:
        candidate, fit, plan = waiting
        run = estimate_run(shape, spec, candidate.profile, catalog, candidate.devices, candidate.gradient_checkpointing)
        reason = (f"{candidate.label}: {candidate.display} can hold the model ({memory_choice(plan)}) "
                  f"but is busy; waiting for capacity in pool {fit.pool} ({fit.message})")
        return PlacementDecision(Outcome.Waiting, reason, tuple(r for r in rejections if r.choice != candidate.key),
                                 candidate, fit.pool, shape, plan.chosen, run)
    return PlacementDecision(Outcome.Unplaceable,
                             "no accelerator choice can run this job: " + "; ".join(r.message for r in rejections),
                             tuple(rejections), shape=shape)


def _placed_reason(candidate: Candidate, fit: Fit, plan: MemoryPlan, run: RunEstimate,
                   rejections: list[Rejection]) -> str:
    parts = [f"{candidate.label}: {candidate.display} fits now in pool {fit.pool}, {memory_choice(plan)}"]
    if run.duration_seconds is not None and run.cost_usd is not None:
        parts.append(f"est. {format_duration(run.duration_seconds)}, ${run.cost_usd:,.2f}")
    if rejections:
        parts.append(f"{len(rejections)} earlier choice{'s' if len(rejections) > 1 else ''} rejected")
    return "; ".join(parts)



def candidate_from_status(placement: PlacementStatus, catalog: Catalog) -> Candidate:
    """Rebuild the candidate of a recorded placement (e.g. after an operator restart), so the
    children render exactly as when they were created."""
    profile = catalog.get(f"{placement.vendor}/{placement.product}")
    return Candidate(profile, placement.devices_per_worker, placement.workers, "recorded placement",
                     placement.data_parallel, placement.gradient_checkpointing)


# Phases whose pods are gone or going: finished, or suspended (KubeRay deletes a suspended RayJob's cluster).
_RESERVE_NOTHING = frozenset(p.value for p in (*TERMINAL_PHASES, Phase.Suspended))


def job_owner(namespace: str, name: str) -> OwnerKey:
    """Who holds a reservation: matched against the object being placed, so it never blocks itself."""
    return ("FineTuneJob", namespace, name)


def job_reservation(body: Mapping[str, Any]) -> Optional[Reservation]:
    """What a FineTuneJob's recorded placement holds on its pool until the workers of that
    attempt are bound (``live_placement`` says when it holds none); None also when its
    status does not parse."""
    raw = live_placement(body, _RESERVE_NOTHING)
    try:
        placement = PlacementStatus.model_validate(raw) if raw else None
    except ValidationError:
        return None
    if placement is None or not placement.pool:
        return None
    meta = body["metadata"]
    return Reservation(job_owner(meta.get("namespace") or "default", meta["name"]), placement.pool,
                       f"{placement.vendor}/{placement.product}", placement.workers, placement.devices_per_worker,
                       {JOB_LABEL: meta["name"], ATTEMPT_LABEL: str(placement.attempt)})
