"""Status derivation: one pure function from what was observed to the FineTuneJob status.

``derive_status`` never talks to the API; the operator gathers the inputs (the placement decision
it just made, the live RayJob, the progress document) and writes the result only when
``status_patch`` says it changed. Condition types and reasons are the closed enums in
``tuneserve.api.status``; ``lastTransitionTime`` moves only when a condition's status flips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional

from tuneserve.api.finetunejob import FineTuneJob, FineTuneJobSpec
from tuneserve.api.status import (
    TERMINAL_PHASES, ArtifactStatus, CheckpointStatus, ChoiceRejection, Condition, ConditionReason,
    ConditionStatus, ConditionType, Estimate, FineTuneJobStatus, Phase, PlacementStatus, ProgressStatus,
    RejectionCode, UsageStatus,
)
from tuneserve.builders.common import rayjob_name
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.finetunejob.placement import PlacementDecision
from tuneserve.core.sizing import format_duration
from tuneserve_workers.contract import Progress

R = ConditionReason
# Rejections a bigger or emptier cluster cannot cure: when every choice fails with one of these,
# the job fails instead of waiting for nodes.
PERMANENT_REJECTIONS = frozenset({RejectionCode.UnknownAccelerator, RejectionCode.InsufficientMemory,
                                  RejectionCode.Unsupported, RejectionCode.TimedOut, RejectionCode.Excluded})


@dataclass(frozen=True)
class Observed:
    """Inputs of one reconcile. ``decision`` is set only when placement ran this time (first
    placement or a fallback, then ``attempt`` is the new attempt); otherwise the previous
    status's placement stands."""
    spec_error: Optional[str] = None
    spec_error_reason: ConditionReason = R.InvalidSpec
    decision: Optional[PlacementDecision] = None
    attempt: int = 1
    fallback_reason: Optional[str] = None
    ray_job: Optional[Mapping[str, Any]] = None
    progress: Optional[Progress] = None
    timed_out: tuple[ChoiceRejection, ...] = field(default=())
    blocked: Optional[str] = None   # e.g. a referenced Secret is missing: Pending, retried, not terminal


def placement_status(decision: PlacementDecision, attempt: int, job_name: str, now: datetime) -> PlacementStatus:
    cand = decision.candidate
    assert cand is not None
    return PlacementStatus(
        attempt=attempt, choice=cand.key, vendor=cand.profile.vendor, product=cand.profile.product,
        accelerator=cand.display, pool=decision.pool, workers=cand.workers,
        devices_per_worker=cand.devices_per_worker, data_parallel=cand.data_parallel, world_size=cand.world_size,
        resource_name=cand.profile.resource_name,
        ray_job_name=rayjob_name(job_name, attempt), price_per_device_hour=cand.profile.price_per_device_hour,
        waiting=decision.outcome == Outcome.Waiting, reason=decision.reason, since=now,
    )


def estimate_status(decision: PlacementDecision) -> Optional[Estimate]:
    if decision.memory is None:
        return None
    run = decision.run
    return Estimate(
        memory_per_device_gib=round(decision.memory.total_gib, 1),
        tokens=run.tokens if run else None,
        tokens_per_second=round(run.tokens_per_second, 1) if run else None,
        duration_seconds=round(run.duration_seconds) if run and run.duration_seconds is not None else None,
        cost_usd=round(run.cost_usd, 2) if run and run.cost_usd is not None else None,
        note=run.note if run else None,
    )


def _parse_time(value: Any) -> Optional[datetime]:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _set(conditions: dict[ConditionType, Condition], previous: Optional[FineTuneJobStatus], type_: ConditionType,
         status: ConditionStatus, reason: ConditionReason, message: str, now: datetime, generation: int) -> None:
    before = previous.condition(type_) if previous else None
    since = before.last_transition_time if before and before.status == status else now
    conditions[type_] = Condition(type=type_, status=status, reason=reason, message=message,
                                  last_transition_time=since, observed_generation=generation)


def _progress_status(progress: Optional[Progress], estimate: Optional[Estimate],
                     spec: FineTuneJobSpec) -> Optional[ProgressStatus]:
    if progress is None:
        if estimate and estimate.duration_seconds is not None:
            return ProgressStatus(summary="0%", eta=f"~{format_duration(estimate.duration_seconds)} (est)")
        return None
    if progress.total_steps:
        pct = int(100 * progress.step / progress.total_steps)
        summary = f"{pct}% ({progress.step}/{progress.total_steps})"
    else:
        summary = f"step {progress.step}"
    eta_seconds = progress.eta_seconds if progress.eta_seconds is not None else remaining_seconds(progress, spec)
    eta = format_duration(eta_seconds) if eta_seconds is not None else None
    return ProgressStatus(step=progress.step, total_steps=progress.total_steps, epoch=round(progress.epoch, 3),
                          loss=None if progress.loss is None else round(progress.loss, 4),
                          eval_loss=None if progress.eval_loss is None else round(progress.eval_loss, 4),
                          tokens_per_second=None if progress.tokens_per_second is None else round(progress.tokens_per_second, 1),
                          eta_seconds=None if eta_seconds is None else round(eta_seconds),
                          precision=progress.precision, world_size=progress.world_size,
                          data_parallel=progress.data_parallel, summary=summary, eta=eta)


def money(usd: float) -> str:
    """'$1,234.57'; under $1 two significant digits ('$0.46', '$0.0042'), so a cost that is
    positive never reads '$0.00'."""
    if usd <= 0:
        return "$0.00"
    if usd >= 1:
        return f"${usd:,.2f}"
    return f"${usd:.{max(2, 1 - math.floor(math.log10(usd)))}f}"


def _attempt_seconds(prev: UsageStatus, new_attempt: bool, ray_job: Optional[Mapping[str, Any]],
                     progress: Optional[Progress], final: bool, now: datetime) -> tuple[Optional[datetime], float]:
    """(start, wall seconds) of the current attempt's Ray job: status.startTime to endTime. Running:
    to now, billed to the minute (status changes once a minute, not every resync). Finished before
    the RayJob shows an endTime: to now, exactly; its RayJob gone (TTL): to the worker's last
    progress update. What was observed never goes down, also after the RayJob is deleted."""
    seen = 0.0 if new_attempt else prev.attempt_seconds
    recorded = None if new_attempt else prev.attempt_start_time
    rj_status = (ray_job or {}).get("status") or {}
    start = _parse_time(rj_status.get("startTime")) or recorded
    if start is None:
        return None, seen
    end = _parse_time(rj_status.get("endTime"))
    if end is None and ray_job is not None:
        end = now if final else now.replace(second=0, microsecond=0)
    if end is None and final and progress is not None and progress.updated_at is not None:
        end = progress.updated_at
    if end is None:
        return start, seen
    return start, max(seen, (end - start).total_seconds())


def remaining_seconds(progress: Optional[Progress], spec: FineTuneJobSpec) -> Optional[float]:
    """The remaining tokens ((totalSteps - step) x tokens per step so far) at the measured tokens/s;
    None before the worker measured a rate."""
    if progress is None or not progress.tokens_per_second or not progress.total_steps:
        return None
    per_step = (progress.tokens_trained / progress.step if progress.step and progress.tokens_trained
                else spec.training.global_batch_size * spec.training.max_seq_length)
    return max(0, progress.total_steps - progress.step) * per_step / progress.tokens_per_second


def _projected_cost(spent: float, progress: Optional[Progress], placement: PlacementStatus,
                    spec: FineTuneJobSpec) -> Optional[float]:
    """Spent + the remaining time at the measured rate x devices x price."""
    remaining = remaining_seconds(progress, spec)
    if remaining is None:
        return None
    return spent + remaining / 3600 * placement.workers * placement.devices_per_worker * placement.price_per_device_hour


def _usage(previous: Optional[FineTuneJobStatus], placement: Optional[PlacementStatus], new_attempt: bool,
           observed: Observed, estimate: Optional[Estimate], spec: FineTuneJobSpec, final: bool, now: datetime) -> UsageStatus:
    """Accelerator-seconds = devices x wall time of the Ray job, summed over attempts; cost = that x
    the price per device-hour (docs/sizing.md)."""
    prev = previous.usage if previous and previous.usage else UsageStatus()
    prior_hours, prior_cost = prev.prior_accelerator_hours, prev.prior_cost_usd
    if new_attempt:
        prior_hours, prior_cost = prev.accelerator_hours, prev.cost_usd
    start, seconds = None, 0.0
    if placement is not None:
        start, seconds = _attempt_seconds(prev, new_attempt, observed.ray_job, observed.progress, final, now)
    devices = placement.workers * placement.devices_per_worker if placement else 0
    price = placement.price_per_device_hour if placement else 0.0
    total_hours = prior_hours + seconds * devices / 3600
    total_cost = prior_cost + seconds * devices / 3600 * price
    estimated = estimate.cost_usd if estimate else None
    projected = total_cost if final else None
    if projected is None and placement is not None:
        projected = _projected_cost(total_cost, observed.progress, placement, spec)
    projected = estimated if projected is None else projected
    summary = money(total_cost)
    if final and estimated is not None:
        summary += f" (est. ~{money(estimated)})"
    elif projected is not None:
        summary += f" of ~{money(projected)}"
    return UsageStatus(accelerator_seconds=round(total_hours * 3600, 1), accelerator_hours=round(total_hours, 6),
                       cost_usd=round(total_cost, 6), prior_accelerator_hours=round(prior_hours, 6),
                       prior_cost_usd=round(prior_cost, 6), attempt_start_time=start, attempt_seconds=round(seconds, 3),
                       projected_cost_usd=None if projected is None else round(projected, 4), cost=summary)


def derive_status(job: FineTuneJob, observed: Observed, now: datetime,
                  previous: Optional[FineTuneJobStatus] = None) -> FineTuneJobStatus:
    """The whole status from this reconcile's observations. Terminal phases stay terminal."""
    gen = job.metadata.generation
    if previous and previous.phase in TERMINAL_PHASES:
        return previous.model_copy(update={"observed_generation": gen})

    conditions: dict[ConditionType, Condition] = {}
    s = lambda t, st, r, m: _set(conditions, previous, t, st, r, m, now, gen)  # noqa: E731
    T, F, U = ConditionStatus.true, ConditionStatus.false, ConditionStatus.unknown

    placement = previous.placement if previous else None
    estimate = previous.estimate if previous else None
    rejected = list(previous.rejected_choices) if previous else []
    decision = observed.decision
    new_attempt = False
    if decision is not None:
        stamp = {(r.choice, r.code): r.at for r in rejected}
        history = [r for r in rejected if r.code == RejectionCode.TimedOut] + list(observed.timed_out)
        fresh = [ChoiceRejection(choice=r.choice, code=r.code, message=r.message, at=stamp.get((r.choice, r.code), now))
                 for r in decision.rejections if r.code != RejectionCode.TimedOut]
        rejected = _dedupe(history + fresh)
        if decision.candidate is not None:
            new_attempt = placement is not None and placement.attempt != observed.attempt
            placement = placement_status(decision, observed.attempt, job.metadata.name, now)
            estimate = estimate_status(decision)
        else:
            placement = None

    progress = observed.progress
    ray_job = observed.ray_job
    rj = (ray_job or {}).get("status") or {}
    deployment, job_status = rj.get("jobDeploymentStatus", ""), rj.get("jobStatus", "")
    restarts = max(previous.restarts if previous else 0, int(rj.get("failed") or 0))
    message: Optional[str] = None

    # Accepted
    if observed.spec_error:
        s(ConditionType.Accepted, F, observed.spec_error_reason, observed.spec_error)
    elif observed.blocked:
        s(ConditionType.Accepted, F, R.SecretNotFound, observed.blocked)
    else:
        s(ConditionType.Accepted, T, R.SpecValid, "spec is valid and the model size is known")

    # Placed
    if observed.spec_error:
        s(ConditionType.Placed, U, R.Placing, "not placed: the spec is not accepted")
    elif decision is not None and decision.outcome == Outcome.Unplaceable:
        s(ConditionType.Placed, F, R.NoAcceptableChoice, decision.reason)
    elif placement is None:
        s(ConditionType.Placed, U, R.Placing, "choosing an accelerator")
    elif placement.waiting:
        s(ConditionType.Placed, T, R.WaitingForCapacity, placement.reason)
    elif placement.attempt > 1:
        s(ConditionType.Placed, T, R.FellBack, (observed.fallback_reason or "fell back") + "; now: " + placement.reason)
    else:
        s(ConditionType.Placed, T, R.FitsNow, placement.reason)

    # Phase
    succeeded = (progress is not None and progress.state == "Succeeded" and progress.artifact_uri) or \
        (deployment == "Complete" and job_status == "SUCCEEDED")
    failed_reason: Optional[ConditionReason] = None
    if observed.spec_error:
        phase, failed_reason, message = Phase.Failed, observed.spec_error_reason, observed.spec_error
    elif decision is not None and decision.outcome == Outcome.Unplaceable:
        permanent = bool(decision.rejections) and all(r.code in PERMANENT_REJECTIONS for r in decision.rejections)
        phase = Phase.Failed if permanent else Phase.Pending
        failed_reason = R.NoAcceptableChoice if permanent else None
        message = decision.reason
    elif observed.blocked:
        phase, message = Phase.Pending, observed.blocked
    elif succeeded:
        phase = Phase.Succeeded
    elif deployment == "Failed" or (deployment == "Complete" and job_status in ("FAILED", "STOPPED")) or \
            (progress is not None and progress.state == "Failed" and deployment in ("Failed", "Complete")):
        phase = Phase.Failed
        failed_reason = R.BackoffLimitExceeded if restarts >= job.spec.backoff_limit > 0 else R.TrainingFailed
        message = (progress.message if progress and progress.message else None) or rj.get("message") or "the Ray job failed"
    elif job.spec.suspend or deployment in ("Suspending", "Suspended"):
        phase = Phase.Suspended
    elif placement is None:
        phase = Phase.Pending
    elif deployment == "Running" and job_status == "RUNNING" and progress is not None and progress.state in ("Running", "Checkpointing"):
        phase = Phase.Running
    elif ray_job is None and placement.waiting:
        phase = Phase.Waiting
    elif ray_job is None:
        phase = Phase.Pending
    elif placement.waiting and deployment in ("", "Initializing"):
        phase = Phase.Waiting
    else:
        phase = Phase.Starting

    # Running
    if phase == Phase.Running:
        s(ConditionType.Running, T, R.Training, f"training on {placement.accelerator if placement else '?'}")
    elif phase == Phase.Starting:
        reason = R.Retrying if deployment == "Retrying" else R.RayClusterStarting
        s(ConditionType.Running, F, reason, f"Ray job {deployment or 'created'}, job status {job_status or 'unknown'}")
    elif phase in TERMINAL_PHASES:
        s(ConditionType.Running, F, R.JobFinished, f"finished: {phase.value}")
    else:
        s(ConditionType.Running, F, R.NotStarted, f"phase {phase.value}")

    # Checkpointed
    last_ckpt = previous.last_checkpoint if previous else None
    if progress is not None and progress.last_checkpoint is not None:
        ck = progress.last_checkpoint
        last_ckpt = CheckpointStatus(uri=ck.uri, step=ck.step, time=ck.time)
    if last_ckpt:
        s(ConditionType.Checkpointed, T, R.CheckpointSaved, f"step {last_ckpt.step} at {last_ckpt.uri}")
    else:
        s(ConditionType.Checkpointed, F, R.NoCheckpointYet, "no checkpoint yet")

    # Suspended
    if phase == Phase.Suspended:
        s(ConditionType.Suspended, T, R.SuspendedByUser, "spec.suspend is true; checkpoints are kept")
    else:
        s(ConditionType.Suspended, F, R.NotSuspended, "")

    # Succeeded / Failed
    artifact = previous.artifact if previous else None
    if phase == Phase.Succeeded:
        if progress is not None and progress.artifact_uri:
            artifact = ArtifactStatus(uri=progress.artifact_uri, base_model=job.spec.base_model.uri,
                                      method=job.spec.method.value, rank=job.spec.lora.rank, digest=progress.artifact_digest)
        s(ConditionType.Succeeded, T, R.AdapterWritten, f"adapter written to {artifact.uri if artifact else job.spec.output.uri}")
        message = f"adapter written to {artifact.uri if artifact else job.spec.output.uri}"
    else:
        s(ConditionType.Succeeded, F, R.InProgress, "")
    if phase == Phase.Failed:
        s(ConditionType.Failed, T, failed_reason or R.TrainingFailed, message or "failed")
    else:
        s(ConditionType.Failed, F, R.InProgress, "")

    if message is None and placement is not None:
        message = placement.reason

    start_time = previous.start_time if previous else None
    if start_time is None and _parse_time(rj.get("startTime")):
        start_time = _parse_time(rj.get("startTime"))
    completion = now if phase in TERMINAL_PHASES else None

    return FineTuneJobStatus(
        phase=phase,
        observed_generation=gen,
        message=message,
        conditions=[conditions[t] for t in ConditionType],
        placement=placement,
        rejected_choices=rejected,
        estimate=estimate,
        progress=_progress_status(progress, estimate, job.spec) or (previous.progress if previous else None),
        last_checkpoint=last_ckpt,
        artifact=artifact,
        usage=_usage(previous, placement, new_attempt, observed, estimate, job.spec, phase in TERMINAL_PHASES, now),
        start_time=start_time,
        completion_time=completion,
        restarts=restarts,
    )


def _dedupe(items: list[ChoiceRejection]) -> list[ChoiceRejection]:
    seen, out = set(), []
    for item in items:
        if (item.choice, item.code) not in seen:
            seen.add((item.choice, item.code))
            out.append(item)
    return out


def status_patch(previous: Optional[Mapping[str, Any]], new: FineTuneJobStatus) -> Optional[dict[str, Any]]:
    """The status to write, or None when nothing changed (avoids write churn and event loops)."""
    rendered = new.to_wire()
    if previous:
        before = FineTuneJobStatus.model_validate(dict(previous)).to_wire()
        if before == rendered:
            return None
    return rendered


def timed_out_history(status: Optional[FineTuneJobStatus]) -> dict[str, str]:
    """Candidate keys that timed out before, for ``decide_placement(timed_out=...)``."""
    if status is None:
        return {}
    return {r.choice: r.message for r in status.rejected_choices if r.code == RejectionCode.TimedOut}
