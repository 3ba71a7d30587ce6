"""Status derivation: one pure function from what was observed to the FineTuneJob status.

``derive_status`` never talks to the API; the operator gathers the inputs (the placement decision
it just made, the live RayJob, the progress document) and writes the result only when
``core.status.status_patch`` says it changed. Each condition is one small function; types and
reasons are the closed enums in ``tuneserve.api.finetunejob_status``; ``lastTransitionTime`` moves
only when a condition's status flips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Optional

from tuneserve.api.finetunejob import FineTuneJob, FineTuneJobSpec
from tuneserve.api.conditions import ChoiceRejection, ConditionStatus
from tuneserve.api.finetunejob_status import (
    TERMINAL_PHASES, ArtifactStatus, CheckpointStatus, Condition, ConditionReason, ConditionType, Estimate,
    REASONS, FineTuneJobStatus, Phase, PlacementStatus, ProgressStatus, UsageStatus,
)
from tuneserve.builders.common import rayjob_name
from tuneserve.core.references import Blocked
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.core.scheduling.pods import pod_condition, transition_time
from tuneserve.core.sizing.model import format_duration
from tuneserve.core.status import (
    ConditionSet, Verdict, accepted_condition, merge_rejections, permanent, placed_condition, unplaceable,
)
from tuneserve.finetunejob.placement import PlacementDecision
from tuneserve_workers.contract import Progress

R = ConditionReason
T, F = ConditionStatus.true, ConditionStatus.false


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
    blocked: Optional[Blocked] = None   # a referenced Secret or object is missing: Pending, retried, not terminal
    attempt_pods: tuple[Mapping[str, Any], ...] = ()   # the current attempt's pods (billing starts when bound)


def placement_status(decision: PlacementDecision, attempt: int, job_name: str, now: datetime) -> PlacementStatus:
    cand = decision.candidate
    assert cand is not None
    return PlacementStatus(
        attempt=attempt, choice=cand.key, vendor=cand.profile.vendor, product=cand.profile.product,
        accelerator=cand.display, pool=decision.pool, workers=cand.workers,
        devices_per_worker=cand.devices_per_worker, data_parallel=cand.data_parallel, world_size=cand.world_size,
        gradient_checkpointing=cand.gradient_checkpointing,
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


# A running attempt's usage moves with the worker's progress reports (each one a status write
# anyway) and, when none comes (the Ray cluster starting, a stuck job), every this many seconds of
# held devices, counted from the attempt's start, so jobs at rest do not all write at once.
BILLING_CATCH_UP_SECONDS = 600


def devices_held_since(attempt_pods: Iterable[Mapping[str, Any]], workers: int, now: datetime) -> Optional[datetime]:
    """When the attempt's last worker pod was bound to a node (its PodScheduled turned True): from
    then on all its devices are held. None while any worker pod is still pending, so a job waiting
    for capacity costs nothing. A bound pod without a transition time counts from ``now``."""
    times = []
    for pod in attempt_pods:
        if ((pod.get("metadata") or {}).get("labels") or {}).get("ray.io/node-type") != "worker":
            continue
        if not (pod.get("spec") or {}).get("nodeName"):
            return None
        scheduled = pod_condition(pod, "PodScheduled")
        times.append((transition_time(scheduled) if scheduled.get("status") == "True" else None) or now)
    return max(times) if times and len(times) >= workers else None


def _attempt_seconds(prev: UsageStatus, new_attempt: bool, observed: Observed, workers: int, final: bool,
                     now: datetime) -> tuple[Optional[datetime], float]:
    """(start, wall seconds) of the current attempt: from when its worker pods all held their
    devices (``devices_held_since``; the RayJob's startTime only if the pods were never
    seen) to the RayJob's endTime. Running: to the worker's last progress report, or the last
    whole ``BILLING_CATCH_UP_SECONDS`` since the start, whichever is later. Finished before the
    RayJob shows an endTime: to now, exactly; its RayJob gone (TTL): to the worker's last progress
    update. What was observed never goes down, also after the RayJob is deleted."""
    seen = 0.0 if new_attempt else prev.attempt_seconds
    rj_status = (observed.ray_job or {}).get("status") or {}
    start = (None if new_attempt else prev.attempt_start_time) or devices_held_since(observed.attempt_pods, workers, now)
    if start is None and final:
        start = _parse_time(rj_status.get("startTime"))
    if start is None:
        return None, seen
    progress = observed.progress
    reported = progress.updated_at if progress is not None else None
    end = _parse_time(rj_status.get("endTime"))
    if end is None and observed.ray_job is not None:
        whole = (now - start).total_seconds() // BILLING_CATCH_UP_SECONDS * BILLING_CATCH_UP_SECONDS
        end = now if final else max(start + timedelta(seconds=whole), reported or start)
    if end is None and final and reported is not None:
        end = reported
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
        start, seconds = _attempt_seconds(prev, new_attempt, observed, placement.workers, final, now)
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


@dataclass(frozen=True)
class _RayJobView:
    """What the status reads of the live RayJob's status."""
    deployment: str
    job_status: str
    failed: int
    message: Optional[str]
    start_time: Optional[datetime]


def _ray_job_view(ray_job: Optional[Mapping[str, Any]]) -> _RayJobView:
    rj = (ray_job or {}).get("status") or {}
    return _RayJobView(deployment=rj.get("jobDeploymentStatus", ""), job_status=rj.get("jobStatus", ""),
                       failed=int(rj.get("failed") or 0), message=rj.get("message"),
                       start_time=_parse_time(rj.get("startTime")))


@dataclass(frozen=True)
class _Placed:
    placement: Optional[PlacementStatus]
    estimate: Optional[Estimate]
    rejected: list[ChoiceRejection]
    new_attempt: bool


def _placed(job: FineTuneJob, observed: Observed, previous: Optional[FineTuneJobStatus], now: datetime) -> _Placed:
    """The placement, estimate and rejection history: the previous ones unless placement ran now."""
    placement = previous.placement if previous else None
    estimate = previous.estimate if previous else None
    rejected = list(previous.rejected_choices) if previous else []
    decision = observed.decision
    if decision is None:
        return _Placed(placement, estimate, rejected, False)
    rejected = merge_rejections(rejected, decision.rejections, observed.timed_out, now)
    if decision.candidate is None:
        return _Placed(None, estimate, rejected, False)
    new_attempt = placement is not None and placement.attempt != observed.attempt
    return _Placed(placement_status(decision, observed.attempt, job.metadata.name, now), estimate_status(decision),
                   rejected, new_attempt)


def _succeeded(progress: Optional[Progress], rj: _RayJobView) -> bool:
    return bool(progress is not None and progress.state == "Succeeded" and progress.artifact_uri) or \
        (rj.deployment == "Complete" and rj.job_status == "SUCCEEDED")


def _ray_job_failed(progress: Optional[Progress], rj: _RayJobView) -> bool:
    return rj.deployment == "Failed" or (rj.deployment == "Complete" and rj.job_status in ("FAILED", "STOPPED")) or \
        (progress is not None and progress.state == "Failed" and rj.deployment in ("Failed", "Complete"))


def _phase(job: FineTuneJob, observed: Observed, placement: Optional[PlacementStatus], rj: _RayJobView,
           restarts: int) -> tuple[Phase, Optional[ConditionReason], Optional[str]]:
    """(phase, the Failed condition's reason, the status message) from what was observed."""
    decision, progress = observed.decision, observed.progress
    if observed.spec_error:
        return Phase.Failed, observed.spec_error_reason, observed.spec_error
    if unplaceable(decision):
        assert decision is not None
        return (Phase.Failed, R.NoAcceptableChoice, decision.reason) if permanent(decision) else \
            (Phase.Pending, None, decision.reason)
    if observed.blocked:
        return Phase.Pending, None, observed.blocked.message
    if _succeeded(progress, rj):
        return Phase.Succeeded, None, None
    if _ray_job_failed(progress, rj):
        reason = R.BackoffLimitExceeded if restarts >= job.spec.backoff_limit > 0 else R.TrainingFailed
        message = (progress.message if progress and progress.message else None) or rj.message or "the Ray job failed"
        return Phase.Failed, reason, message
    return _active_phase(job, placement, observed, rj), None, None


def _active_phase(job: FineTuneJob, placement: Optional[PlacementStatus], observed: Observed, rj: _RayJobView) -> Phase:
    """Neither failed nor finished: suspended, pending, waiting, starting or running."""
    progress = observed.progress
    if job.spec.suspend or rj.deployment in ("Suspending", "Suspended"):
        return Phase.Suspended
    if placement is None:
        return Phase.Pending
    if rj.deployment == "Running" and rj.job_status == "RUNNING" and progress is not None and \
            progress.state in ("Running", "Checkpointing"):
        return Phase.Running
    if observed.ray_job is None:
        return Phase.Waiting if placement.waiting else Phase.Pending
    if placement.waiting and rj.deployment in ("", "Initializing"):
        return Phase.Waiting
    return Phase.Starting


def _running(phase: Phase, placement: Optional[PlacementStatus], rj: _RayJobView) -> Verdict[ConditionReason]:
    if phase == Phase.Running:
        return Verdict(T, R.Training, f"training on {placement.accelerator if placement else '?'}")
    if phase == Phase.Starting:
        reason = R.Retrying if rj.deployment == "Retrying" else R.RayClusterStarting
        return Verdict(F, reason, f"Ray job {rj.deployment or 'created'}, job status {rj.job_status or 'unknown'}")
    if phase in TERMINAL_PHASES:
        return Verdict(F, R.JobFinished, f"finished: {phase.value}")
    return Verdict(F, R.NotStarted, f"phase {phase.value}")


def _last_checkpoint(progress: Optional[Progress], previous: Optional[FineTuneJobStatus]) -> Optional[CheckpointStatus]:
    if progress is not None and progress.last_checkpoint is not None:
        ck = progress.last_checkpoint
        return CheckpointStatus(uri=ck.uri, step=ck.step, time=ck.time)
    return previous.last_checkpoint if previous else None


def _checkpointed(last: Optional[CheckpointStatus]) -> Verdict[ConditionReason]:
    if last:
        return Verdict(T, R.CheckpointSaved, f"step {last.step} at {last.uri}")
    return Verdict(F, R.NoCheckpointYet, "no checkpoint yet")


def _suspended(phase: Phase) -> Verdict[ConditionReason]:
    if phase == Phase.Suspended:
        return Verdict(T, R.SuspendedByUser, "spec.suspend is true; checkpoints are kept")
    return Verdict(F, R.NotSuspended, "")


def _artifact(job: FineTuneJob, phase: Phase, progress: Optional[Progress],
              previous: Optional[FineTuneJobStatus]) -> Optional[ArtifactStatus]:
    if phase == Phase.Succeeded and progress is not None and progress.artifact_uri:
        return ArtifactStatus(uri=progress.artifact_uri, base_model=job.spec.base_model.uri, method=job.spec.method.value,
                              rank=job.spec.lora.rank, digest=progress.artifact_digest)
    return previous.artifact if previous else None


def _written(job: FineTuneJob, artifact: Optional[ArtifactStatus]) -> str:
    return f"adapter written to {artifact.uri if artifact else job.spec.output.uri}"


def _succeeded_condition(job: FineTuneJob, phase: Phase, artifact: Optional[ArtifactStatus]) -> Verdict[ConditionReason]:
    if phase == Phase.Succeeded:
        return Verdict(T, R.AdapterWritten, _written(job, artifact))
    return Verdict(F, R.InProgress, "")


def _failed_condition(phase: Phase, reason: Optional[ConditionReason], message: Optional[str]) -> Verdict[ConditionReason]:
    if phase == Phase.Failed:
        return Verdict(T, reason or R.TrainingFailed, message or "failed")
    return Verdict(F, R.InProgress, "")


def derive_status(job: FineTuneJob, observed: Observed, now: datetime,
                  previous: Optional[FineTuneJobStatus] = None) -> FineTuneJobStatus:
    """The whole status from this reconcile's observations. Terminal phases stay terminal."""
    gen = job.metadata.generation
    if previous and previous.phase in TERMINAL_PHASES:
        return previous.model_copy(update={"observed_generation": gen})
    placed = _placed(job, observed, previous, now)
    placement, progress, rj = placed.placement, observed.progress, _ray_job_view(observed.ray_job)
    restarts = max(previous.restarts if previous else 0, rj.failed)
    phase, failed_reason, message = _phase(job, observed, placement, rj, restarts)
    last_ckpt = _last_checkpoint(progress, previous)
    artifact = _artifact(job, phase, progress, previous)

    conditions = ConditionSet(Condition, REASONS, previous, now, gen)
    conditions.set(ConditionType.Accepted, accepted_condition(R, observed.spec_error, observed.spec_error_reason, observed.blocked))
    conditions.set(ConditionType.Placed, placed_condition(R, observed.spec_error, observed.decision, placement,
                                                          observed.fallback_reason))
    conditions.set(ConditionType.Running, _running(phase, placement, rj))
    conditions.set(ConditionType.Checkpointed, _checkpointed(last_ckpt))
    conditions.set(ConditionType.Suspended, _suspended(phase))
    conditions.set(ConditionType.Succeeded, _succeeded_condition(job, phase, artifact))
    conditions.set(ConditionType.Failed, _failed_condition(phase, failed_reason, message))
    if phase == Phase.Succeeded:
        message = _written(job, artifact)
    if message is None and placement is not None:
        message = placement.reason

    final = phase in TERMINAL_PHASES
    return FineTuneJobStatus(
        phase=phase, observed_generation=gen, message=message, conditions=conditions.ordered(ConditionType),
        placement=placement, rejected_choices=placed.rejected, estimate=placed.estimate,
        progress=_progress_status(progress, placed.estimate, job.spec) or (previous.progress if previous else None),
        last_checkpoint=last_ckpt, artifact=artifact,
        usage=_usage(previous, placement, placed.new_attempt, observed, placed.estimate, job.spec, final, now),
        start_time=(previous.start_time if previous else None) or rj.start_time,
        completion_time=now if final else None, restarts=restarts,
    )
