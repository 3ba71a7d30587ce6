"""One ModelServe reconcile as a pure plan (see finetunejob/reconcile.py for the FineTuneJob one).

Placement is decided once and kept; it is decided again only when a field that rolls out a new
Ray cluster changed (base model, engine, accelerators: not adapters or replicas) or when the
chosen pool left the pods unschedulable past the timeout. The RayService keeps its name, so the
endpoint survives both (KubeRay's NewCluster upgrade switches traffic once the new one is ready).

A replicas change re-renders the RayService, which KubeRay applies to its Serve application but
not to the RayClusters it already runs; the plan also patches those clusters' worker-group bounds
(``replica_bounds_patches``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.modelserve import ModelServe
from tuneserve.api.modelserve_status import ModelServeStatus, ServeConditionReason
from tuneserve.builders.common import rayservice_name, serve_status_configmap_name
from tuneserve.modelserve.builders.rayservice import raycluster_scaling_patch
from tuneserve.core.catalog import Catalog
from tuneserve.core.hashing import to_apply
from tuneserve.core.plan import Event, JsonPatch, Plan, finish, readable
from tuneserve.core.references import Blocked, KnownNames, check_references
from tuneserve.core.status import invalid_spec, status_patch, timed_out_history
from tuneserve.core.scheduling.fallback import Placing, fall_back, unschedulable_since
from tuneserve.core.scheduling.inventory import Inventory
from tuneserve.core.scheduling.reservations import Reservation, placement_inventory
from tuneserve.core.sizing.model import ModelSizeUnknown
from tuneserve.modelserve.adapters import AdapterResolution, read_replica_reports, resolve_adapters
from tuneserve.modelserve.builders.children import build_modelserve_children
from tuneserve.modelserve.placement import ServePlacementDecision, decide_serve_placement, serve_candidate, serve_owner
from tuneserve.modelserve.status import ServeObserved, derive_modelserve_status, service_endpoints

ROLLOUT_ANNOTATION = "tuneserve.dev/rollout-fingerprint"
IN_PLACE_FIELDS = ("adapters", "replicas")
# Event reason (not a condition reason): a live RayCluster was given the spec's replicas.min/max.
BOUNDS_UPDATED = "ReplicaBoundsUpdated"


@dataclass(frozen=True)
class ServeWorld:
    nodes: Iterable[Mapping[str, Any]]              # every node and pod in the cluster (for free capacity)
    pods: Iterable[Mapping[str, Any]]
    serve_pods: list[Mapping[str, Any]]
    children: dict[tuple[str, str], Mapping[str, Any]]
    jobs: Mapping[str, Optional[Mapping[str, Any]]]        # referenced FineTuneJobs (None: not found)
    secrets: Mapping[str, frozenset[str]]              # the namespace's Secrets: name -> key names
    # RayClusters KubeRay made from this ModelServe's RayService, by name (worker groups' bounds).
    ray_clusters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    known: Optional[KnownNames] = None   # ServiceAccounts, claims, PriorityClasses (None: not checked)
    # What every placed FineTuneJob and ModelServe holds until its workers are bound (this one's
    # own entry is skipped when it is placed).
    reservations: Iterable[Reservation] = ()


def rollout_fingerprint(serve: ModelServe) -> str:
    """Hash of every spec field whose change needs a new Ray cluster."""
    wire = {k: v for k, v in serve.spec.to_wire().items() if k not in IN_PLACE_FIELDS}
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


def plan_modelserve(body: Mapping[str, Any], world: ServeWorld, catalog: Catalog, now: datetime) -> Plan:
    plan = Plan()
    previous_raw = body.get("status") or None
    previous = ModelServeStatus.model_validate(previous_raw) if previous_raw else None
    try:
        serve = ModelServe.from_body(body)
    except ValidationError as exc:
        return invalid_spec(plan, body, readable(exc), now)

    resolution = resolve_adapters(serve.spec, world.jobs)
    status_cm = world.children.get(("ConfigMap", serve_status_configmap_name(serve.metadata.name)))
    reports = read_replica_reports((status_cm or {}).get("data"), now)
    live_rs = world.children.get(("RayService", rayservice_name(serve.metadata.name)))
    try:
        placing = _place(serve, world, catalog, previous, live_rs, now)
    except ModelSizeUnknown as exc:
        return _finish(plan, serve, ServeObserved(spec_error=str(exc), spec_error_reason=ServeConditionReason.ModelSizeUnknown,
                                                  resolution=resolution, reports=reports), previous, now)
    plan.requeue_after = placing.requeue_after
    blocked = _render(plan, serve, world, catalog, placing, previous, resolution)
    plan.patch.extend(replica_bounds_patches(serve, live_rs, world.ray_clusters))
    observed = ServeObserved(blocked=blocked, decision=placing.decision, attempt=placing.attempt,
                             fallback_reason=placing.fallback_reason, timed_out=placing.timed_out,
                             resolution=resolution, reports=reports, ray_service=live_rs,
                             endpoints=service_endpoints(world.serve_pods, live_rs))
    return _finish(plan, serve, observed, previous, now)


def _inventory(serve: ModelServe, world: ServeWorld, catalog: Catalog) -> Inventory:
    """Free capacity for this ModelServe's placement: bound pods and other objects' reservations out."""
    owner = serve_owner(serve.metadata.namespace, serve.metadata.name)
    return placement_inventory(world.nodes, world.pods, world.reservations, catalog, owner)


def _place(serve: ModelServe, world: ServeWorld, catalog: Catalog, previous: Optional[ModelServeStatus],
           live_rs: Optional[Mapping[str, Any]], now: datetime) -> Placing[ServePlacementDecision]:
    """First placement; placement again when a rollout field changed; a fallback when the pods stayed
    unschedulable past the timeout. Raises ModelSizeUnknown."""
    placement = previous.placement if previous else None
    live_fingerprint = ((live_rs or {}).get("metadata", {}).get("annotations") or {}).get(ROLLOUT_ANNOTATION)
    if placement is None or (live_fingerprint is not None and live_fingerprint != rollout_fingerprint(serve)):
        decision = decide_serve_placement(serve.spec, catalog, _inventory(serve, world, catalog), timed_out_history(previous))
        if placement is None:
            return Placing(1, decision)
        if decision.candidate is not None and decision.candidate.key != placement.choice:
            return Placing(placement.attempt + 1, decision, f"spec changed: now {decision.candidate.key}")
        return Placing(placement.attempt, decision)
    moved = fall_back(placement.choice, placement.attempt, unschedulable_since(world.serve_pods),
                      timedelta(minutes=serve.spec.accelerators.fallback_after_minutes), now, timed_out_history(previous),
                      lambda history: decide_serve_placement(serve.spec, catalog, _inventory(serve, world, catalog), history))
    return moved if moved is not None else Placing(placement.attempt)


def _render(plan: Plan, serve: ModelServe, world: ServeWorld, catalog: Catalog,
            placing: Placing[ServePlacementDecision], previous: Optional[ModelServeStatus],
            resolution: AdapterResolution) -> Optional[Blocked]:
    """Plan the children (the RayService annotated with the rollout fingerprint), unless a
    referenced Secret or object is missing: that is returned."""
    placement = previous.placement if previous else None
    decision = placing.decision
    if decision is not None and decision.candidate is not None:
        candidate, pool = decision.candidate, decision.pool
    elif decision is None and placement is not None:
        candidate = serve_candidate(catalog.get(f"{placement.vendor}/{placement.product}"),
                                    placement.tensor_parallel_size, serve.spec.replicas.min)
        pool = placement.pool
    else:
        return None
    children = build_modelserve_children(serve, candidate, pool, resolution.desired, catalog)
    blocked = check_references(plan, children, serve.spec, uris(serve), world.known, world.secrets)
    if blocked is not None:
        return blocked
    fingerprint = rollout_fingerprint(serve)
    for i, child in enumerate(children):
        if child["kind"] == "RayService":
            children[i] = {**child, "metadata": {**child["metadata"], "annotations": {
                **(child["metadata"].get("annotations") or {}), ROLLOUT_ANNOTATION: fingerprint}}}
    plan.apply.extend(to_apply(children, world.children))
    return None


def uris(serve: ModelServe) -> dict[str, Optional[str]]:
    """The spec's URIs by field path (their pvc:// claims are references)."""
    out: dict[str, Optional[str]] = {"spec.baseModel.uri": serve.spec.base_model.location()}
    out.update({f"spec.adapters[{i}].uri": a.uri for i, a in enumerate(serve.spec.adapters)})
    return out


def live_cluster_names(ray_service: Optional[Mapping[str, Any]]) -> list[str]:
    """The RayClusters KubeRay runs for a RayService, from its status: the active one, and the
    pending one while an upgrade prepares it."""
    status = (ray_service or {}).get("status") or {}
    names = [(status.get(key) or {}).get("rayClusterName") for key in ("activeServiceStatus", "pendingServiceStatus")]
    return [name for name in dict.fromkeys(names) if name]


def replica_bounds_patches(serve: ModelServe, ray_service: Optional[Mapping[str, Any]],
                           ray_clusters: Mapping[str, Mapping[str, Any]]) -> list[JsonPatch]:
    """One patch per live RayCluster whose worker group lacks replicas.min/max (KubeRay keeps a
    cluster's bounds when only they changed in the RayService), each with its Event."""
    low, high = serve.spec.replicas.min, serve.spec.replicas.max
    patches = []
    for name in live_cluster_names(ray_service):
        live = ray_clusters.get(name)
        ops = raycluster_scaling_patch(serve, live) if live is not None else None
        if ops is None:
            continue
        group = live["spec"]["workerGroupSpecs"][0]
        message = (f"RayCluster {name}, worker group {group.get('groupName')}: replica bounds "
                   f"{group.get('minReplicas')}..{group.get('maxReplicas')} -> {low}..{high}")
        clamped = next((op["value"] for op in ops if op["op"] != "test" and op["path"].endswith("/replicas")), None)
        if clamped is not None:
            message += f", replicas {group.get('replicas')} -> {clamped}"
        patches.append(JsonPatch("ray.io/v1", "RayCluster", name, ops, Event("Normal", BOUNDS_UPDATED, message)))
    return patches


def _finish(plan: Plan, serve: ModelServe, observed: ServeObserved, previous: Optional[ModelServeStatus],
            now: datetime) -> Plan:
    return finish(plan, derive_modelserve_status(serve, observed, now, previous), previous, status_patch)
