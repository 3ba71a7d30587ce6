"""One FineTuneJob reconcile as a pure plan: what to apply, patch or delete, which status to write,
which events to post. The controller (controller/handlers.py) gathers the inputs from its indexes and
carry the plan out; nothing here talks to the API, so it is tested without a cluster.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.conditions import ChoiceRejection, RejectionCode
from tuneserve.api.finetunejob_status import TERMINAL_PHASES, ConditionReason, FineTuneJobStatus
from tuneserve.builders.common import ATTEMPT_LABEL, rayjob_name
from tuneserve.catalog import Catalog
from tuneserve.core.hashing import needs_apply, with_applied_hash
from tuneserve.core.plan import Plan, finish, missing_secrets, readable
from tuneserve.core.scheduling.fallback import fallback_verdict, unschedulable_since
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.core.scheduling.inventory import build_inventory
from tuneserve.core.sizing import ModelSizeUnknown
from tuneserve.core.status import invalid_spec, status_patch, timed_out_history
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.finetunejob.placement import candidate_from_status, decide_placement
from tuneserve.finetunejob.status import Observed, derive_status
from tuneserve_workers.contract import PROGRESS_KEY, Progress


@dataclass(frozen=True)
class World:
    """What the operator observed for one FineTuneJob (from kopf's indexes)."""
    nodes: list[Mapping[str, Any]]
    pods: list[Mapping[str, Any]]                 # every pod in the cluster (for free capacity)
    job_pods: list[Mapping[str, Any]]             # pods labelled with this job
    ray_jobs: dict[str, Mapping[str, Any]]        # this job's RayJobs by name
    children: dict[tuple[str, str], Mapping[str, Any]]  # (kind, name) -> live child, for the hash check
    progress_configmap: Optional[Mapping[str, Any]]
    secrets: Mapping[str, frozenset[str]]             # the namespace's Secrets: name -> key names (never values)


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
        return plan   # finished: children stay until the job is deleted (owner references)

    try:
        job = FineTuneJob.from_body(body)
    except ValidationError as exc:
        return invalid_spec(plan, body, readable(exc), now)   # no parsed job to derive a status from

    placement = previous.placement if previous else None
    attempt = placement.attempt if placement else 1
    decision = None
    fallback_reason = None
    timed_out: list[ChoiceRejection] = []
    try:
        if placement is None:
            inventory = build_inventory(world.nodes, world.pods)
            decision = decide_placement(job.spec, catalog, inventory, timed_out_history(previous))
        else:
            attempt_pods = [p for p in world.job_pods
                            if (p.get("metadata") or {}).get("labels", {}).get(ATTEMPT_LABEL) == str(placement.attempt)]
            since = unschedulable_since(attempt_pods)
            verdict = fallback_verdict(placement.choice, since,
                                       timedelta(minutes=job.spec.accelerators.fallback_after_minutes), now)
            if verdict.move_on:
                history = {**timed_out_history(previous), placement.choice: verdict.reason}
                inventory = build_inventory(world.nodes, world.pods)
                decision = decide_placement(job.spec, catalog, inventory, history)
                timed_out = [ChoiceRejection(choice=placement.choice, code=RejectionCode.TimedOut,
                                             message=verdict.reason, at=now)]
                fallback_reason = verdict.reason
                attempt = placement.attempt + 1
            elif verdict.deadline is not None:
                plan.requeue_after = max(1.0, (verdict.deadline - now).total_seconds())
            elif placement.waiting and not any((p.get("spec") or {}).get("nodeName") for p in attempt_pods):
                # Waiting for capacity and nothing bound yet: a choice may fit now.
                inventory = build_inventory(world.nodes, world.pods)
                fresh = decide_placement(job.spec, catalog, inventory, timed_out_history(previous))
                if fresh.outcome == Outcome.Placed:
                    decision = fresh
                    if fresh.candidate.key != placement.choice:
                        attempt = placement.attempt + 1
                        fallback_reason = f"{fresh.candidate.key} fits now while {placement.choice} is still busy"
    except ModelSizeUnknown as exc:
        observed = Observed(spec_error=str(exc), spec_error_reason=ConditionReason.ModelSizeUnknown)
        return _finish(plan, job, observed, previous, now)

    candidate, pool = None, None
    if decision is not None and decision.candidate is not None:
        candidate, pool = decision.candidate, decision.pool
    elif decision is None and placement is not None:
        candidate, pool = candidate_from_status(placement, catalog), placement.pool

    blocked = None
    if candidate is not None:
        children = build_finetune_children(job, candidate, pool, attempt, catalog)
        blocked = missing_secrets(children, world.secrets)
        if blocked is None:
            for child in children:
                desired = with_applied_hash(child)
                live = world.children.get((child["kind"], child["metadata"]["name"]))
                if needs_apply(desired, live):
                    plan.apply.append(desired)
        current = rayjob_name(job.metadata.name, attempt)
        for name in sorted(world.ray_jobs):
            if name != current:
                plan.delete.append(("ray.io/v1", "RayJob", name))
    if blocked:
        plan.requeue_after = 10.0

    ray_job = world.ray_jobs.get(rayjob_name(job.metadata.name, attempt))
    observed = Observed(decision=decision, attempt=attempt, fallback_reason=fallback_reason,
                        ray_job=ray_job, progress=_parse_progress(world.progress_configmap),
                        timed_out=tuple(timed_out), blocked=blocked)
    return _finish(plan, job, observed, previous, now)


def _finish(plan: Plan, job: FineTuneJob, observed: Observed, previous: Optional[FineTuneJobStatus],
            now: datetime) -> Plan:
    return finish(plan, derive_status(job, observed, now, previous), previous, status_patch)
