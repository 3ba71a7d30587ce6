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
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.modelserve import ModelServe
from tuneserve.api.modelserve_status import ModelServeStatus, ServeConditionReason
from tuneserve.api.conditions import ChoiceRejection, RejectionCode
from tuneserve.builders.common import rayservice_name
from tuneserve.builders.rayservice import raycluster_scaling_patch
from tuneserve.catalog import Catalog
from tuneserve.core.hashing import needs_apply, with_applied_hash
from tuneserve.core.plan import Event, JsonPatch, Plan, finish, missing_secrets, readable
from tuneserve.core.status import invalid_spec, status_patch, timed_out_history
from tuneserve.core.scheduling.fallback import fallback_verdict, unschedulable_since
from tuneserve.core.scheduling.inventory import build_inventory
from tuneserve.core.sizing import ModelSizeUnknown
from tuneserve.modelserve.adapters import read_replica_reports, resolve_adapters
from tuneserve.modelserve.builders.children import build_modelserve_children
from tuneserve.modelserve.placement import decide_serve_placement, serve_candidate
from tuneserve.modelserve.status import ServeObserved, derive_modelserve_status

ROLLOUT_ANNOTATION = "tuneserve.dev/rollout-fingerprint"
IN_PLACE_FIELDS = ("adapters", "replicas")
# Event reason (not a condition reason): a live RayCluster was given the spec's replicas.min/max.
BOUNDS_UPDATED = "ReplicaBoundsUpdated"


@dataclass(frozen=True)
class ServeWorld:
    nodes: list[Mapping[str, Any]]
    pods: list[Mapping[str, Any]]
    serve_pods: list[Mapping[str, Any]]
    children: dict[tuple[str, str], Mapping[str, Any]]
    jobs: Mapping[str, Optional[Mapping[str, Any]]]        # referenced FineTuneJobs (None: not found)
    secrets: Mapping[str, frozenset[str]]              # the namespace's Secrets: name -> key names
    # RayClusters KubeRay made from this ModelServe's RayService, by name (worker groups' bounds).
    ray_clusters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
    status_cm = world.children.get(("ConfigMap", f"{serve.metadata.name}-serve-status"))
    reports = read_replica_reports((status_cm or {}).get("data"), now)
    live_rs = world.children.get(("RayService", rayservice_name(serve.metadata.name)))
    fingerprint = rollout_fingerprint(serve)
    live_fingerprint = ((live_rs or {}).get("metadata", {}).get("annotations") or {}).get(ROLLOUT_ANNOTATION)

    placement = previous.placement if previous else None
    attempt = placement.attempt if placement else 1
    decision, fallback_reason, timed_out = None, None, []
    try:
        if placement is None or (live_fingerprint is not None and live_fingerprint != fingerprint):
            decision = decide_serve_placement(serve.spec, catalog, build_inventory(world.nodes, world.pods),
                                              timed_out_history(previous))
            if placement is not None and decision.candidate is not None and decision.candidate.key != placement.choice:
                attempt = placement.attempt + 1
                fallback_reason = f"spec changed: now {decision.candidate.key}"
        else:
            since = unschedulable_since(world.serve_pods)
            verdict = fallback_verdict(placement.choice, since,
                                       timedelta(minutes=serve.spec.accelerators.fallback_after_minutes), now)
            if verdict.move_on:
                history = {**timed_out_history(previous), placement.choice: verdict.reason}
                decision = decide_serve_placement(serve.spec, catalog, build_inventory(world.nodes, world.pods), history)
                timed_out = [ChoiceRejection(choice=placement.choice, code=RejectionCode.TimedOut,
                                             message=verdict.reason, at=now)]
                fallback_reason, attempt = verdict.reason, placement.attempt + 1
            elif verdict.deadline is not None:
                plan.requeue_after = max(1.0, (verdict.deadline - now).total_seconds())
    except ModelSizeUnknown as exc:
        return _finish(plan, serve, ServeObserved(spec_error=str(exc), spec_error_reason=ServeConditionReason.ModelSizeUnknown,
                                                  resolution=resolution, reports=reports), previous, now)

    candidate, pool = None, None
    if decision is not None and decision.candidate is not None:
        candidate, pool = decision.candidate, decision.pool
    elif decision is None and placement is not None:
        candidate = serve_candidate(catalog.get(f"{placement.vendor}/{placement.product}"),
                                    placement.tensor_parallel_size, serve.spec.replicas.min)
        pool = placement.pool

    blocked = None
    if candidate is not None:
        children = build_modelserve_children(serve, candidate, pool, resolution.desired, catalog)
        blocked = missing_secrets(children, world.secrets)
        if blocked is None:
            for child in children:
                if child["kind"] == "RayService":
                    child = {**child, "metadata": {**child["metadata"], "annotations": {
                        **(child["metadata"].get("annotations") or {}), ROLLOUT_ANNOTATION: fingerprint}}}
                desired = with_applied_hash(child)
                if needs_apply(desired, world.children.get((child["kind"], child["metadata"]["name"]))):
                    plan.apply.append(desired)
        else:
            plan.requeue_after = 10.0
    plan.patch.extend(replica_bounds_patches(serve, live_rs, world.ray_clusters))

    observed = ServeObserved(blocked=blocked, decision=decision, attempt=attempt, fallback_reason=fallback_reason,
                             timed_out=tuple(timed_out), resolution=resolution, reports=reports, ray_service=live_rs)
    return _finish(plan, serve, observed, previous, now)


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
