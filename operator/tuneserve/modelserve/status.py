"""ModelServe status derivation: one pure function from what was observed to the status.

The operator gathers the inputs (the placement decision if it placed this time, the adapter
resolution, the live RayService, the replicas' reports) and writes the result only when
``core.status.status_patch`` says it changed. Each condition is one small function;
``lastTransitionTime`` moves only when a condition's status flips, an adapter's ``since`` only
when its state changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional

from tuneserve.modelserve.adapters import AdapterResolution, ReplicaReports, adapter_states
from tuneserve.api.modelserve import ModelServe
from tuneserve.api.modelserve_status import (
    AdapterState, AdapterStatus, ModelServeStatus, ReplicaStatus, ServeCondition, ServeConditionReason,
    REASONS, ServeConditionType, ServePhase, ServePlacementStatus,
)
from tuneserve.api.conditions import ChoiceRejection, ConditionStatus
from tuneserve.builders.common import openai_service_name, rayservice_name
from tuneserve.modelserve.builders.serve import endpoint_url
from tuneserve.core.references import Blocked
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.core.scheduling.pods import pod_condition
from tuneserve.core.status import (
    ConditionSet, Verdict, accepted_condition, merge_rejections, permanent, placed_condition, unplaceable,
)
from tuneserve.modelserve.placement import ServePlacementDecision
from tuneserve_workers.contract import SERVE_FAILURE_REPORT_SECONDS

R = ServeConditionReason
T, F = ConditionStatus.true, ConditionStatus.false


@dataclass(frozen=True)
class ServeObserved:
    """Inputs of one reconcile. ``decision`` only when placement ran this time (first placement,
    a fallback, or a rollout-relevant spec change); otherwise the previous placement stands."""
    spec_error: Optional[str] = None
    spec_error_reason: ServeConditionReason = R.InvalidSpec
    blocked: Optional[Blocked] = None                    # a referenced Secret or object is missing
    decision: Optional[ServePlacementDecision] = None
    attempt: int = 1
    fallback_reason: Optional[str] = None
    timed_out: tuple[ChoiceRejection, ...] = field(default=())
    resolution: Optional[AdapterResolution] = None
    reports: Optional[ReplicaReports] = None
    ray_service: Optional[Mapping[str, Any]] = None
    endpoints: int = 0                                   # Ready pods behind the Service (service_endpoints)


def serve_placement_status(serve: ModelServe, decision: ServePlacementDecision, attempt: int,
                           now: datetime) -> ServePlacementStatus:
    cand = decision.candidate
    assert cand is not None
    return ServePlacementStatus(
        attempt=attempt, choice=cand.key, vendor=cand.profile.vendor, product=cand.profile.product,
        accelerator=f"{cand.profile.display_name} x{cand.devices_per_worker} per replica", pool=decision.pool,
        tensor_parallel_size=cand.devices_per_worker, tensor_parallel_auto=decision.tensor_parallel_auto,
        resource_name=cand.profile.resource_name, ray_service_name=rayservice_name(serve.metadata.name),
        price_per_device_hour=cand.profile.price_per_device_hour,
        memory_per_device_gib=round(decision.memory.total_gib, 1) if decision.memory else None,
        waiting=decision.outcome == Outcome.Waiting, reason=decision.reason, since=now,
    )


def cost_per_hour(replicas: int, placement: Optional[ServePlacementStatus]) -> float:
    """Replicas x devices per replica x price per device-hour."""
    if placement is None:
        return 0.0
    return round(replicas * placement.tensor_parallel_size * placement.price_per_device_hour, 2)


def _ray_service_view(ray_service: Optional[Mapping[str, Any]]) -> tuple[bool, bool, str, str, str]:
    """(ready, upgrading, app status, message, Ready's reason) from a KubeRay v1.3+ RayService status."""
    status = (ray_service or {}).get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conds.get("Ready") or {}).get("status") == "True" or status.get("serviceStatus") == "Running"
    upgrading = (conds.get("UpgradeInProgress") or {}).get("status") == "True"
    apps = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {})
    app = next(iter(apps.values()), {}) if apps else {}
    message = app.get("message") or (conds.get("Ready") or {}).get("message") or ""
    return ready, upgrading, app.get("status", ""), message, (conds.get("Ready") or {}).get("reason") or ""


def _placement(serve: ModelServe, observed: ServeObserved, previous: Optional[ModelServeStatus],
               now: datetime) -> tuple[Optional[ServePlacementStatus], list[ChoiceRejection]]:
    """The placement and rejection history: the previous ones unless placement ran now. A decision
    for the same choice and waiting state keeps the placement's ``since``."""
    placement = previous.placement if previous else None
    rejected = list(previous.rejected_choices) if previous else []
    decision = observed.decision
    if decision is None:
        return placement, rejected
    rejected = merge_rejections(rejected, decision.rejections, observed.timed_out, now)
    if decision.candidate is None:
        return None, rejected
    same = placement is not None and placement.choice == decision.candidate.key and \
        placement.waiting == (decision.outcome == Outcome.Waiting)
    new = serve_placement_status(serve, decision, observed.attempt, now)
    return (new.model_copy(update={"since": placement.since}) if same and placement else new), rejected


def _replicas(serve: ModelServe, reports: Optional[ReplicaReports]) -> tuple[ReplicaStatus, int]:
    """The replica counts, and how many replicas report at all (ready or not)."""
    spec = serve.spec
    ready = len(reports.ready) if reports else 0
    live = len(reports.fresh) if reports else 0
    target = reports.target_replicas() if reports else None
    desired = min(spec.replicas.max, max(spec.replicas.min, target if target is not None else live))
    return ReplicaStatus(ready=ready, desired=desired, min=spec.replicas.min, max=spec.replicas.max,
                         summary=f"{ready}/{desired}"), live


def _adapters(observed: ServeObserved, previous: Optional[ModelServeStatus], now: datetime) -> list[AdapterStatus]:
    """Each listed adapter's state; ``since`` moves only when the state changes."""
    if observed.resolution is None:
        return list(previous.adapters) if previous else []
    before = {a.name: a for a in previous.adapters} if previous else {}
    out = []
    for v in adapter_states(observed.resolution, observed.reports or ReplicaReports((), (), ())):
        old = before.get(v.name)
        since = old.since if old and old.state == v.state and old.since else now
        out.append(AdapterStatus(name=v.name, source=v.source, uri=v.uri, state=v.state, message=v.message, since=since))
    return out


@dataclass(frozen=True)
class _Serving:
    """What Ready and Degraded read: the RayService's view and the replicas' reports."""
    rs_ready: bool
    upgrading: bool
    app_status: str
    rs_message: str
    rs_reason: str        # the RayService's Ready reason ("" before KubeRay writes one)
    ready_replicas: int
    live: int
    failure: Optional[str]
    endpoints: int

    @property
    def serving(self) -> bool:
        return self.rs_ready and self.ready_replicas > 0 and self.endpoints > 0


def _not_placed(observed: ServeObserved, placement: Optional[ServePlacementStatus]
                ) -> Optional[tuple[ServePhase, Verdict[ServeConditionReason], Optional[str]]]:
    """Ready while nothing can run yet: invalid spec, unplaceable, blocked, or still placing."""
    decision = observed.decision
    if observed.spec_error or unplaceable(decision):
        phase = ServePhase.Failed if observed.spec_error or permanent(decision) else ServePhase.Pending
        message = observed.spec_error or (decision.reason if decision else None)
        return phase, Verdict(F, R.NotPlaced, message or ""), message
    if observed.blocked:
        return ServePhase.Pending, Verdict(F, R.NotPlaced, observed.blocked.message), observed.blocked.message
    if placement is None:
        return ServePhase.Pending, Verdict(F, R.NotPlaced, "choosing an accelerator"), None
    return None


def _ready(serve: ModelServe, observed: ServeObserved, placement: Optional[ServePlacementStatus],
           view: _Serving) -> tuple[ServePhase, Verdict[ServeConditionReason], Optional[str]]:
    """(phase, the Ready condition, the status message when it is not Ready's message)."""
    early = _not_placed(observed, placement)
    if early is not None:
        return early
    assert placement is not None
    if view.app_status == "DEPLOY_FAILED" and not view.rs_ready:
        message = f"the serve application failed to deploy: {view.failure or view.rs_message}".rstrip(": ")
        return ServePhase.Failed, Verdict(F, R.ApplicationFailed, message), message
    if not view.serving and view.failure:
        return ServePhase.Failed, Verdict(F, R.ReplicaFailed, view.failure), view.failure
    if view.serving:
        n = view.ready_replicas
        return ServePhase.Ready, Verdict(T, R.Serving, f"{n} replica{'s' if n != 1 else ''} serving "
                                                        f"{serve.spec.model_name()} at {endpoint_url(serve)}"), None
    if view.rs_ready and serve.spec.replicas.min == 0 and view.live == 0:
        return ServePhase.Ready, Verdict(T, R.ScaledToZero, "scaled to zero; the first request starts a replica"), None
    if observed.ray_service is None and placement.waiting:
        return ServePhase.Waiting, Verdict(F, R.RayServiceStarting, placement.reason), None
    if view.rs_ready and view.ready_replicas > 0:
        return ServePhase.Deploying, Verdict(F, R.NotInService, f"replicas are ready; no Ready pod backs Service "
                                                                 f"{openai_service_name(serve.metadata.name)} yet"), None
    if view.rs_ready:
        return ServePhase.Deploying, Verdict(F, R.NoReadyReplicas, "the application is up but no replica reports ready yet"), None
    if view.app_status in ("DEPLOYING", "UNHEALTHY"):
        detail = f": {view.rs_message}" if view.rs_message else ""
        return ServePhase.Deploying, Verdict(F, R.ApplicationDeploying, f"serve application {view.app_status}{detail}"), None
    phase = ServePhase.Waiting if placement.waiting and view.rs_reason in NEVER_SERVED_REASONS else ServePhase.Deploying
    return phase, Verdict(F, R.RayServiceStarting, view.rs_message or "Ray cluster starting"), None


NEVER_SERVED_REASONS = frozenset({"", "Initializing", "InitializingTimeout"})
"""KubeRay's RayService ``Ready`` reasons before its first serve endpoint (ray-operator
apis/ray/v1/rayservice_types.go). A placement made while its pool was busy says Waiting only until
then: after it served once, losing every endpoint (a replica pod killed) is a restart, not a wait."""


def _adapters_ready(listed: int, adapters: list[AdapterStatus]) -> Verdict[ServeConditionReason]:
    failed = [a for a in adapters if a.state == AdapterState.Failed]
    loading = [a for a in adapters if a.state == AdapterState.Loading]
    pending = [a for a in adapters if a.state == AdapterState.Pending]
    loaded = sum(1 for a in adapters if a.state == AdapterState.Loaded)
    if listed == 0:
        return Verdict(T, R.NoAdapters, "no adapters listed; serving the base model")
    if failed:
        return Verdict(F, R.AdaptersFailed, "; ".join(f"{a.name}: {a.message}" for a in failed))
    if loaded == listed:
        return Verdict(T, R.AllAdaptersLoaded, f"{loaded}/{listed} adapters loaded")
    if loading:
        return Verdict(F, R.AdaptersLoading, ", ".join(a.name for a in loading) + " loading")
    return Verdict(F, R.AdaptersPending, "; ".join(f"{a.name}: {a.message}" for a in pending) or "waiting for replicas")


def _degraded(serve: ModelServe, phase: ServePhase, adapters: list[AdapterStatus], view: _Serving
              ) -> Verdict[ServeConditionReason]:
    """Serving, but less than wanted: a failed adapter, an unhealthy app, too few ready replicas."""
    failed = [a for a in adapters if a.state == AdapterState.Failed]
    if phase != ServePhase.Ready:
        return Verdict(F, R.AsDesired, "")
    if failed:
        return Verdict(T, R.AdaptersUnavailable, f"{len(failed)} adapter{'s' if len(failed) > 1 else ''} failed: "
                       + ", ".join(a.name for a in failed))
    if view.app_status == "UNHEALTHY":
        return Verdict(T, R.ApplicationUnhealthy, view.rs_message or "serve application UNHEALTHY")
    if view.ready_replicas < serve.spec.replicas.min:
        return Verdict(T, R.ReplicasUnavailable, f"{view.ready_replicas} of at least {serve.spec.replicas.min} replicas ready"
                       + (f"; {view.failure}" if view.failure else ""))
    return Verdict(F, R.AsDesired, "")


def _upgrading(view: _Serving) -> Verdict[ServeConditionReason]:
    if view.upgrading:
        return Verdict(T, R.NewClusterStarting,
                       "a new Ray cluster is starting with the changed base model/engine; the current one keeps serving")
    return Verdict(F, R.NoUpgrade, "")


def _serving(observed: ServeObserved, ready_replicas: int, live: int) -> _Serving:
    rs_ready, upgrading, app_status, rs_message, rs_reason = _ray_service_view(observed.ray_service)
    return _Serving(rs_ready, upgrading, app_status, rs_message, rs_reason, ready_replicas, live, replica_failure(observed.reports),
                    observed.endpoints)


def derive_modelserve_status(serve: ModelServe, observed: ServeObserved, now: datetime,
                             previous: Optional[ModelServeStatus] = None) -> ModelServeStatus:
    """The whole status from this reconcile's observations."""
    spec = serve.spec
    placement, rejected = _placement(serve, observed, previous, now)
    replicas, live = _replicas(serve, observed.reports)
    adapters = _adapters(observed, previous, now)
    view = _serving(observed, replicas.ready, live)
    phase, ready, message = _ready(serve, observed, placement, view)
    degraded = _degraded(serve, phase, adapters, view)
    if degraded.status == T:
        phase = ServePhase.Degraded

    conditions = ConditionSet(ServeCondition, REASONS, previous, now, serve.metadata.generation)
    conditions.set(ServeConditionType.Accepted, accepted_condition(R, observed.spec_error, observed.spec_error_reason,
                                                                   observed.blocked))
    conditions.set(ServeConditionType.Placed, placed_condition(R, observed.spec_error, observed.decision, placement,
                                                               observed.fallback_reason))
    conditions.set(ServeConditionType.Ready, ready)
    conditions.set(ServeConditionType.AdaptersReady, _adapters_ready(len(spec.adapters), adapters))
    conditions.set(ServeConditionType.Degraded, degraded)
    conditions.set(ServeConditionType.Upgrading, _upgrading(view))

    hourly = cost_per_hour(max(replicas.ready, live), placement)
    loaded = sum(1 for a in adapters if a.state == AdapterState.Loaded)
    return ModelServeStatus(
        phase=phase, observed_generation=serve.metadata.generation,
        message=message if message is not None else ready.message,
        endpoint=endpoint_url(serve) if placement is not None else None, served_model_name=spec.model_name(),
        conditions=conditions.ordered(ServeConditionType), replicas=replicas, adapters=adapters,
        adapter_summary=f"{loaded}/{len(spec.adapters)}", placement=placement, rejected_choices=rejected,
        cost_per_hour_usd=hourly, cost=f"${hourly:,.2f}/h",
    )


def replica_failure(reports: Optional[ReplicaReports]) -> Optional[str]:
    """The newest replica failure (its engine could not start or died) in the failure window,
    as a status message, e.g. "replica r1 failed (3 replicas in the last 15m): engine failed to
    start: VllmWorker-0 died: Fatal Python error: Illegal instruction (SIGILL) at ..."."""
    if not reports or not reports.failed:
        return None
    newest, count = reports.failed[0], len(reports.failed)
    times = f" ({count} replicas in the last {SERVE_FAILURE_REPORT_SECONDS // 60}m)" if count > 1 else ""
    retry = "; Ray Serve is starting another" if any(r.updated_at > newest.updated_at for r in reports.fresh) else ""
    return f"replica {newest.replica_id} failed{times}: {newest.message or 'no cause reported'}{retry}"


def service_endpoints(serve_pods: list[Mapping[str, Any]], ray_service: Optional[Mapping[str, Any]]) -> int:
    """How many pods KubeRay's serve Service sends traffic to now: the active cluster's pods labelled
    ``ray.io/serve: "true"`` whose Ready condition is True (kubelet's readiness probe passed). A
    replica reports ready before its pod turns Ready, so Ready waits for this, else the Service
    refuses connections while the status says Ready."""
    active = (((ray_service or {}).get("status") or {}).get("activeServiceStatus") or {}).get("rayClusterName")
    count = 0
    for pod in serve_pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get("ray.io/serve") != "true" or (active and labels.get("ray.io/cluster") != active):
            continue
        count += pod_condition(pod, "Ready").get("status") == "True"
    return count
