"""ModelServe status derivation: one pure function from what was observed to the status.

The operator gathers the inputs (the placement decision if it placed this time, the adapter
resolution, the live RayService, the replicas' reports) and writes the result only when
``status_patch`` says it changed. ``lastTransitionTime`` moves only when a condition's status
flips; an adapter's ``since`` only when its state changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional

from tuneserve.modelserve.adapters import AdapterResolution, ReplicaReports, adapter_states
from tuneserve.api.modelserve import ModelServe
from tuneserve.api.modelserve_status import (
    AdapterState, AdapterStatus, ModelServeStatus, ReplicaStatus, ServeCondition, ServeConditionReason,
    ServeConditionType, ServePhase, ServePlacementStatus,
)
from tuneserve.api.status import ChoiceRejection, ConditionStatus, RejectionCode, StatusModel
from tuneserve.builders.common import rayservice_name
from tuneserve.modelserve.builders.serve import endpoint_url
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.modelserve.placement import ServePlacementDecision
from tuneserve_workers.contract import SERVE_FAILURE_REPORT_SECONDS

R = ServeConditionReason
T, F, U = ConditionStatus.true, ConditionStatus.false, ConditionStatus.unknown
PERMANENT_REJECTIONS = frozenset({RejectionCode.UnknownAccelerator, RejectionCode.InsufficientMemory,
                                  RejectionCode.Unsupported, RejectionCode.TimedOut})


@dataclass(frozen=True)
class ServeObserved:
    """Inputs of one reconcile. ``decision`` only when placement ran this time (first placement,
    a fallback, or a rollout-relevant spec change); otherwise the previous placement stands."""
    spec_error: Optional[str] = None
    spec_error_reason: ServeConditionReason = R.InvalidSpec
    blocked: Optional[str] = None                        # e.g. a referenced Secret is missing
    decision: Optional[ServePlacementDecision] = None
    attempt: int = 1
    fallback_reason: Optional[str] = None
    timed_out: tuple[ChoiceRejection, ...] = field(default=())
    resolution: Optional[AdapterResolution] = None
    reports: Optional[ReplicaReports] = None
    ray_service: Optional[Mapping[str, Any]] = None


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


def _ray_service_view(ray_service: Optional[Mapping[str, Any]]) -> tuple[bool, bool, str, str]:
    """(ready, upgrading, app status, message) from a KubeRay v1.3+ RayService status."""
    status = (ray_service or {}).get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conds.get("Ready") or {}).get("status") == "True" or status.get("serviceStatus") == "Running"
    upgrading = (conds.get("UpgradeInProgress") or {}).get("status") == "True"
    apps = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {})
    app = next(iter(apps.values()), {}) if apps else {}
    message = app.get("message") or (conds.get("Ready") or {}).get("message") or ""
    return ready, upgrading, app.get("status", ""), message


def derive_modelserve_status(serve: ModelServe, observed: ServeObserved, now: datetime,
                             previous: Optional[ModelServeStatus] = None) -> ModelServeStatus:
    """The whole status from this reconcile's observations."""
    gen = serve.metadata.generation
    spec = serve.spec
    conditions: dict[ServeConditionType, ServeCondition] = {}

    def s(type_: ServeConditionType, status: ConditionStatus, reason: ServeConditionReason, message: str) -> None:
        before = previous.condition(type_) if previous else None
        since = before.last_transition_time if before and before.status == status else now
        conditions[type_] = ServeCondition(type=type_, status=status, reason=reason, message=message,
                                           last_transition_time=since, observed_generation=gen)

    # Placement (kept from the previous status unless placement ran now).
    placement = previous.placement if previous else None
    rejected = list(previous.rejected_choices) if previous else []
    decision = observed.decision
    if decision is not None:
        stamp = {(r.choice, r.code): r.at for r in rejected}
        history = [r for r in rejected if r.code == RejectionCode.TimedOut] + list(observed.timed_out)
        fresh = [ChoiceRejection(choice=r.choice, code=r.code, message=r.message, at=stamp.get((r.choice, r.code), now))
                 for r in decision.rejections if r.code != RejectionCode.TimedOut]
        seen, rejected = set(), []
        for r in history + fresh:
            if (r.choice, r.code) not in seen:
                seen.add((r.choice, r.code))
                rejected.append(r)
        if decision.candidate is not None:
            same = placement is not None and placement.choice == decision.candidate.key and placement.waiting == (decision.outcome == Outcome.Waiting)
            new = serve_placement_status(serve, decision, observed.attempt, now)
            placement = new.model_copy(update={"since": placement.since}) if same and placement else new
        else:
            placement = None

    # Accepted / Placed
    unplaceable = decision is not None and decision.outcome == Outcome.Unplaceable
    if observed.spec_error:
        s(ServeConditionType.Accepted, F, observed.spec_error_reason, observed.spec_error)
        s(ServeConditionType.Placed, U, R.Placing, "not placed: the spec is not accepted")
    else:
        if observed.blocked:
            s(ServeConditionType.Accepted, F, R.SecretNotFound, observed.blocked)
        else:
            s(ServeConditionType.Accepted, T, R.SpecValid, "spec is valid and the model size is known")
        if unplaceable:
            s(ServeConditionType.Placed, F, R.NoAcceptableChoice, decision.reason)
        elif placement is None:
            s(ServeConditionType.Placed, U, R.Placing, "choosing an accelerator")
        elif placement.waiting:
            s(ServeConditionType.Placed, T, R.WaitingForCapacity, placement.reason)
        elif placement.attempt > 1:
            s(ServeConditionType.Placed, T, R.FellBack, (observed.fallback_reason or "fell back") + "; now: " + placement.reason)
        else:
            s(ServeConditionType.Placed, T, R.FitsNow, placement.reason)

    # Replicas
    reports = observed.reports
    ready_replicas = len(reports.ready) if reports else 0
    live = len(reports.fresh) if reports else 0
    target = reports.target_replicas() if reports else None
    desired = min(spec.replicas.max, max(spec.replicas.min, target if target is not None else live))
    replicas = ReplicaStatus(ready=ready_replicas, desired=desired, min=spec.replicas.min, max=spec.replicas.max,
                             summary=f"{ready_replicas}/{desired}")

    # Adapters
    prev_adapters = {a.name: a for a in previous.adapters} if previous else {}
    adapters: list[AdapterStatus] = []
    if observed.resolution is not None:
        verdicts = adapter_states(observed.resolution, reports or ReplicaReports((), (), ()))
        for v in verdicts:
            before = prev_adapters.get(v.name)
            since = before.since if before and before.state == v.state and before.since else now
            adapters.append(AdapterStatus(name=v.name, source=v.source, uri=v.uri, state=v.state, message=v.message, since=since))
    elif previous:
        adapters = list(previous.adapters)
    listed = len(spec.adapters)
    loaded = sum(1 for a in adapters if a.state == AdapterState.Loaded)
    failed = [a for a in adapters if a.state == AdapterState.Failed]
    pending = [a for a in adapters if a.state == AdapterState.Pending]
    loading = [a for a in adapters if a.state == AdapterState.Loading]

    # Ready
    rs_ready, upgrading, app_status, rs_message = _ray_service_view(observed.ray_service)
    serving = rs_ready and ready_replicas > 0
    failure = replica_failure(reports)
    message: Optional[str] = None
    if observed.spec_error or unplaceable:
        phase = ServePhase.Failed if observed.spec_error or _permanent(decision) else ServePhase.Pending
        message = observed.spec_error or (decision.reason if decision else None)
        s(ServeConditionType.Ready, F, R.NotPlaced, message or "")
    elif observed.blocked:
        phase, message = ServePhase.Pending, observed.blocked
        s(ServeConditionType.Ready, F, R.NotPlaced, observed.blocked)
    elif placement is None:
        phase = ServePhase.Pending
        s(ServeConditionType.Ready, F, R.NotPlaced, "choosing an accelerator")
    elif app_status == "DEPLOY_FAILED" and not rs_ready:
        why = failure or rs_message
        phase, message = ServePhase.Failed, f"the serve application failed to deploy: {why}".rstrip(": ")
        s(ServeConditionType.Ready, F, R.ApplicationFailed, message)
    elif not serving and failure:
        phase, message = ServePhase.Failed, failure
        s(ServeConditionType.Ready, F, R.ReplicaFailed, message)
    elif serving:
        phase = ServePhase.Ready
        s(ServeConditionType.Ready, T, R.Serving, f"{ready_replicas} replica{'s' if ready_replicas != 1 else ''} serving {spec.model_name()} at {endpoint_url(serve)}")
    elif rs_ready and spec.replicas.min == 0 and live == 0:
        phase = ServePhase.Ready
        s(ServeConditionType.Ready, T, R.ScaledToZero, "scaled to zero; the first request starts a replica")
    elif observed.ray_service is None and placement.waiting:
        phase = ServePhase.Waiting
        s(ServeConditionType.Ready, F, R.RayServiceStarting, placement.reason)
    elif rs_ready:
        phase = ServePhase.Deploying
        s(ServeConditionType.Ready, F, R.NoReadyReplicas, "the application is up but no replica reports ready yet")
    elif app_status in ("DEPLOYING", "UNHEALTHY"):
        phase = ServePhase.Deploying
        s(ServeConditionType.Ready, F, R.ApplicationDeploying, f"serve application {app_status}" + (f": {rs_message}" if rs_message else ""))
    else:
        phase = ServePhase.Waiting if placement.waiting else ServePhase.Deploying
        s(ServeConditionType.Ready, F, R.RayServiceStarting, rs_message or "Ray cluster starting")

    # AdaptersReady
    if listed == 0:
        s(ServeConditionType.AdaptersReady, T, R.NoAdapters, "no adapters listed; serving the base model")
    elif failed:
        s(ServeConditionType.AdaptersReady, F, R.AdaptersFailed, "; ".join(f"{a.name}: {a.message}" for a in failed))
    elif loaded == listed:
        s(ServeConditionType.AdaptersReady, T, R.AllAdaptersLoaded, f"{loaded}/{listed} adapters loaded")
    elif loading:
        s(ServeConditionType.AdaptersReady, F, R.AdaptersLoading, ", ".join(a.name for a in loading) + " loading")
    else:
        s(ServeConditionType.AdaptersReady, F, R.AdaptersPending, "; ".join(f"{a.name}: {a.message}" for a in pending) or "waiting for replicas")

    # Degraded: serving, but less than wanted.
    if phase == ServePhase.Ready and failed:
        s(ServeConditionType.Degraded, T, R.AdaptersUnavailable, f"{len(failed)} adapter{'s' if len(failed) > 1 else ''} failed: " + ", ".join(a.name for a in failed))
        phase = ServePhase.Degraded
    elif phase == ServePhase.Ready and app_status == "UNHEALTHY":
        s(ServeConditionType.Degraded, T, R.ApplicationUnhealthy, rs_message or "serve application UNHEALTHY")
        phase = ServePhase.Degraded
    elif phase == ServePhase.Ready and ready_replicas < spec.replicas.min:
        s(ServeConditionType.Degraded, T, R.ReplicasUnavailable, f"{ready_replicas} of at least {spec.replicas.min} replicas ready"
          + (f"; {failure}" if failure else ""))
        phase = ServePhase.Degraded
    else:
        s(ServeConditionType.Degraded, F, R.AsDesired, "")

    # Upgrading
    if upgrading:
        s(ServeConditionType.Upgrading, T, R.NewClusterStarting, "a new Ray cluster is starting with the changed base model/engine; the current one keeps serving")
    else:
        s(ServeConditionType.Upgrading, F, R.NoUpgrade, "")

    if message is None:
        message = conditions[ServeConditionType.Ready].message
    running = max(ready_replicas, live)
    hourly = cost_per_hour(running, placement)
    return ModelServeStatus(
        phase=phase,
        observed_generation=gen,
        message=message,
        endpoint=endpoint_url(serve) if placement is not None else None,
        served_model_name=spec.model_name(),
        conditions=[conditions[t] for t in ServeConditionType],
        replicas=replicas,
        adapters=adapters,
        adapter_summary=f"{loaded}/{listed}",
        placement=placement,
        rejected_choices=rejected,
        cost_per_hour_usd=hourly,
        cost=f"${hourly:,.2f}/h",
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


def _permanent(decision: Optional[ServePlacementDecision]) -> bool:
    return decision is not None and bool(decision.rejections) and all(r.code in PERMANENT_REJECTIONS for r in decision.rejections)


def status_patch(previous: Optional[Mapping[str, Any]], new: StatusModel) -> Optional[dict[str, Any]]:
    """The status to write, or None when nothing changed (avoids write churn and event loops).
    The FineTuneJob's ``conditions.status_patch`` with the status type taken from ``new``."""
    rendered = new.to_wire()
    if previous and type(new).model_validate(dict(previous)).to_wire() == rendered:
        return None
    return rendered


def timed_out_history(status: Optional[ModelServeStatus]) -> dict[str, str]:
    """Candidate keys that timed out before, for ``decide_serve_placement(timed_out=...)``."""
    if status is None:
        return {}
    return {r.choice: r.message for r in status.rejected_choices if r.code == RejectionCode.TimedOut}
