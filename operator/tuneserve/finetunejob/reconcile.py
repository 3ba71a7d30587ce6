"""One FineTuneJob reconcile as a pure plan: what to apply, patch or delete, which status to write,
which events to post. The controller (controller/handlers.py) gathers the inputs from its indexes and
carry the plan out; nothing here talks to the API, so it is tested without a cluster.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.finetunejob_status import TERMINAL_PHASES, ConditionReason, FineTuneJobStatus, PlacementStatus
from tuneserve.builders.common import ATTEMPT_LABEL, rayjob_name
from tuneserve.core.catalog import Catalog
from tuneserve.core.hashing import to_apply
from tuneserve.core.plan import Plan, finish, readable
from tuneserve.core.references import Blocked, KnownNames, check_references
from tuneserve.core.scheduling.fallback import Placing, fall_back, pool_lost, unschedulable_since
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.core.scheduling.inventory import Inventory
from tuneserve.core.scheduling.reservations import Reservation, placement_inventory
from tuneserve.core.sizing.model import ModelSizeUnknown
from tuneserve.core.status import invalid_spec, status_patch, timed_out_history
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.finetunejob.placement import PlacementDecision, candidate_from_status, decide_placement, job_owner
from tuneserve.finetunejob.status import Observed, derive_status
from tuneserve_workers.contract import PROGRESS_KEY, Progress


@dataclass(frozen=True)
class World:
    """What the operator observed for one FineTuneJob (from kopf's indexes)."""
    nodes: Iterable[Mapping[str, Any]]
    pods: Iterable[Mapping[str, Any]]             # every pod in the cluster (for free capacity)
    job_pods: list[Mapping[str, Any]]             # pods labelled with this job
    ray_jobs: dict[str, Mapping[str, Any]]        # this job's RayJobs by name
    children: dict[tuple[str, str], Mapping[str, Any]]  # (kind, name) -> live child, for the hash check
    progress_configmap: Optional[Mapping[str, Any]]
    secrets: Mapping[str, frozenset[str]]             # the namespace's Secrets: name -> key names (never values)
    known: Optional[KnownNames] = None                # ServiceAccounts, claims, PriorityClasses (None: not checked)
    # What every placed FineTuneJob and ModelServe holds until its workers are bound (this one's
    # own entry is skipped when it is placed).
    reservations: Iterable[Reservation] = ()


def _parse_progress(cm: Optional[Mapping[str, Any]]) -> Optional[Progress]:
    raw = ((cm or {}).get("data") or {}).get(PROGRESS_KEY)
    if not raw:
        return None
    try:
        return Progress.model_validate_json(raw)
    except ValidationError:
        return None   # a half-written or foreign document: ignore, the next update replaces it


def plan_finetunejob(body: Mapping[str, Any], world: World, catalog: Catalog, now: datetime) -> Plan:
    plan = Plan()
    previous_raw = body.get("status") or None
    previous = FineTuneJobStatus.model_validate(previous_raw) if previous_raw else None
    if previous and previous.phase in TERMINAL_PHASES:
        # Finished: children stay until the job is deleted (owner references), but not a RayJob of
        # an attempt the status moved past (a crash between the Failed status and that delete must
        # not leave unschedulable pods that would start a failed job once capacity frees).
        attempt = previous.placement.attempt if previous.placement else None
        plan.delete.extend(_other_rayjobs(world, body["metadata"]["name"], attempt))
        return plan
    try:
        job = FineTuneJob.from_body(body)
    except ValidationError as exc:
        return invalid_spec(plan, body, readable(exc), now)   # no parsed job to derive a status from
    try:
        placing = _place(job, world, catalog, previous, now)
    except ModelSizeUnknown as exc:
        observed = Observed(spec_error=str(exc), spec_error_reason=ConditionReason.ModelSizeUnknown)
        return _finish(plan, job, observed, previous, now)
    plan.requeue_after = placing.requeue_after
    blocked = _render(plan, job, world, catalog, placing, previous)
    ray_job = world.ray_jobs.get(rayjob_name(job.metadata.name, placing.attempt))
    observed = Observed(decision=placing.decision, attempt=placing.attempt, fallback_reason=placing.fallback_reason,
                        ray_job=ray_job, progress=_parse_progress(world.progress_configmap),
                        timed_out=placing.timed_out, blocked=blocked,
                        attempt_pods=tuple(pods_of_attempt(world, placing.attempt)))
    return _finish(plan, job, observed, previous, now)


def pods_of_attempt(world: World, attempt: int) -> list[Mapping[str, Any]]:
    return [p for p in world.job_pods if _labels(p).get(ATTEMPT_LABEL) == str(attempt)]


def _inventory(job: FineTuneJob, world: World, catalog: Catalog) -> Inventory:
    """Free capacity for this job's placement: bound pods and other objects' reservations out."""
    owner = job_owner(job.metadata.namespace, job.metadata.name)
    return placement_inventory(world.nodes, world.pods, world.reservations, catalog, owner)


def _place(job: FineTuneJob, world: World, catalog: Catalog, previous: Optional[FineTuneJobStatus],
           now: datetime) -> Placing[PlacementDecision]:
    """First placement; a fallback when the attempt's pods stayed unschedulable past the timeout;
    a sooner choice while waiting for capacity. Raises ModelSizeUnknown."""
    placement = previous.placement if previous else None
    if placement is None:
        return Placing(1, decide_placement(job.spec, catalog, _inventory(job, world, catalog), timed_out_history(previous)))
    attempt_pods = pods_of_attempt(world, placement.attempt)
    decide = lambda history: decide_placement(job.spec, catalog, _inventory(job, world, catalog), history)  # noqa: E731
    lost_since = unschedulable_since(p for p in attempt_pods if _labels(p).get("ray.io/node-type") == "worker")
    if lost_since is not None and _run_failed(world.ray_jobs.get(rayjob_name(job.metadata.name, placement.attempt))):
        return pool_lost(placement.choice, placement.attempt, lost_since, now, timed_out_history(previous), decide)
    moved = fall_back(placement.choice, placement.attempt, unschedulable_since(attempt_pods),
                      timedelta(minutes=job.spec.accelerators.fallback_after_minutes), now, timed_out_history(previous),
                      decide)
    if moved is not None:
        return moved
    if placement.waiting and not any((p.get("spec") or {}).get("nodeName") for p in attempt_pods):
        return _sooner(job, world, catalog, previous, placement)
    return Placing(placement.attempt)


def _labels(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}


def _run_failed(ray_job: Optional[Mapping[str, Any]]) -> bool:
    """KubeRay gave up on the attempt's Ray job (no retry left: its backoffLimit is used up)."""
    rj = (ray_job or {}).get("status") or {}
    return rj.get("jobDeploymentStatus") == "Failed" or \
        (rj.get("jobDeploymentStatus") == "Complete" and rj.get("jobStatus") in ("FAILED", "STOPPED"))


def _sooner(job: FineTuneJob, world: World, catalog: Catalog, previous: Optional[FineTuneJobStatus],
            placement: PlacementStatus) -> Placing[PlacementDecision]:
    """Waiting for capacity and nothing bound yet: a choice may fit now."""
    fresh = decide_placement(job.spec, catalog, _inventory(job, world, catalog), timed_out_history(previous))
    if fresh.outcome != Outcome.Placed or fresh.candidate is None:
        return Placing(placement.attempt)
    if fresh.candidate.key == placement.choice:
        return Placing(placement.attempt, fresh)
    return Placing(placement.attempt + 1, fresh, f"{fresh.candidate.key} fits now while {placement.choice} is still busy")


def _render(plan: Plan, job: FineTuneJob, world: World, catalog: Catalog, placing: Placing[PlacementDecision],
            previous: Optional[FineTuneJobStatus]) -> Optional[Blocked]:
    """Plan the children of the current attempt (unless a referenced Secret or object is missing:
    returned) and the deletion of earlier attempts' RayJobs."""
    placement = previous.placement if previous else None
    decision = placing.decision
    # Earlier attempts' RayJobs go also when no choice is left (the last one timed out).
    plan.delete.extend(_other_rayjobs(world, job.metadata.name, placing.attempt))
    if decision is not None and decision.candidate is not None:
        candidate, pool = decision.candidate, decision.pool
    elif decision is None and placement is not None:
        candidate, pool = candidate_from_status(placement, catalog), placement.pool
    else:
        return None
    children = build_finetune_children(job, candidate, pool, placing.attempt, catalog)
    blocked = check_references(plan, children, job.spec, uris(job), world.known, world.secrets)
    if blocked is None:
        plan.apply.extend(to_apply(children, world.children))
    return blocked


def _other_rayjobs(world: World, job_name: str, attempt: Optional[int]) -> list[tuple[str, str, str]]:
    """Deletions of the RayJobs of every attempt but ``attempt`` (all of them when None)."""
    current = rayjob_name(job_name, attempt) if attempt else None
    return [("ray.io/v1", "RayJob", name) for name in sorted(world.ray_jobs) if name != current]


def uris(job: FineTuneJob) -> dict[str, Optional[str]]:
    """The spec's URIs by field path (their pvc:// claims are references)."""
    spec = job.spec
    return {"spec.baseModel.uri": spec.base_model.location(), "spec.dataset.uri": spec.dataset.uri,
            "spec.output.uri": spec.output.uri, "spec.checkpoint.uri": spec.checkpoint.uri if spec.checkpoint else None}


def _finish(plan: Plan, job: FineTuneJob, observed: Observed, previous: Optional[FineTuneJobStatus],
            now: datetime) -> Plan:
    return finish(plan, derive_status(job, observed, now, previous), previous, status_patch)
