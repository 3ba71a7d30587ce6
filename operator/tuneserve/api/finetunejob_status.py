"""FineTuneJob status: what `kubectl get ftj` and `kubectl describe ftj` show.

Written only by the operator (status subresource). Condition types and reasons are closed sets
(enums), so clients can switch on them. Display strings (``summary``, ``eta``, ``cost``) exist
because printer columns can show one JSONPath each.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Optional

from pydantic import Field

from tuneserve.api.conditions import ChoiceRejection, KindCondition, Reason, StatusModel
from tuneserve_workers.contract import DataParallel, Precision


class Phase(str, Enum):
    Pending = "Pending"          # accepted, not placed yet
    Waiting = "Waiting"          # placed on an accelerator that is busy now; waiting for capacity
    Starting = "Starting"        # Ray cluster starting / job submitted
    Running = "Running"          # training steps are happening
    Suspended = "Suspended"      # spec.suspend
    Succeeded = "Succeeded"      # adapter written
    Failed = "Failed"            # terminal; see the Failed condition


TERMINAL_PHASES = frozenset({Phase.Succeeded, Phase.Failed})


class ConditionType(str, Enum):
    Accepted = "Accepted"          # spec understood, model size known
    Placed = "Placed"              # an accelerator choice was made
    Running = "Running"            # Ray job running
    Checkpointed = "Checkpointed"  # at least one checkpoint exists
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"



class ConditionReason(Reason):
    # Accepted
    SpecValid = "SpecValid"
    InvalidSpec = "InvalidSpec"
    ModelSizeUnknown = "ModelSizeUnknown"
    SecretNotFound = "SecretNotFound"        # a referenced Secret or key is missing (not terminal)
    # a ServiceAccount, PersistentVolumeClaim or PriorityClass the spec names is missing (not
    # terminal; the message names the field): core/references.py
    ReferenceNotFound = "ReferenceNotFound"
    # Placed
    Placing = "Placing"
    FitsNow = "FitsNow"
    WaitingForCapacity = "WaitingForCapacity"
    FellBack = "FellBack"
    NoAcceptableChoice = "NoAcceptableChoice"
    # Running
    NotStarted = "NotStarted"
    RayClusterStarting = "RayClusterStarting"
    Training = "Training"
    Retrying = "Retrying"
    JobFinished = "JobFinished"
    # Checkpointed
    NoCheckpointYet = "NoCheckpointYet"
    CheckpointSaved = "CheckpointSaved"
    # Succeeded / Failed
    AdapterWritten = "AdapterWritten"
    TrainingFailed = "TrainingFailed"
    BackoffLimitExceeded = "BackoffLimitExceeded"
    InProgress = "InProgress"
    # Suspended
    SuspendedByUser = "SuspendedByUser"
    NotSuspended = "NotSuspended"

    @classmethod
    def warnings(cls) -> frozenset[Reason]:
        return frozenset({
            cls.InvalidSpec, cls.ModelSizeUnknown, cls.NoAcceptableChoice, cls.TrainingFailed,
            cls.BackoffLimitExceeded, cls.SecretNotFound, cls.ReferenceNotFound, cls.FellBack,
        })

    @classmethod
    def quiet_when_new(cls) -> frozenset[Reason]:
        return frozenset({
            cls.InProgress, cls.NotSuspended, cls.NotStarted, cls.NoCheckpointYet, cls.Placing,
        })


_R = ConditionReason
_ACCEPTED = frozenset({_R.SpecValid, _R.InvalidSpec, _R.ModelSizeUnknown, _R.SecretNotFound, _R.ReferenceNotFound})
# The reasons each condition type may carry (KubeRay's style: reasons belong to their type).
REASONS: dict[ConditionType, frozenset[ConditionReason]] = {
    ConditionType.Accepted: _ACCEPTED,
    ConditionType.Placed: frozenset({_R.Placing, _R.FitsNow, _R.WaitingForCapacity, _R.FellBack, _R.NoAcceptableChoice}),
    ConditionType.Running: frozenset({_R.NotStarted, _R.RayClusterStarting, _R.Training, _R.Retrying, _R.JobFinished}),
    ConditionType.Checkpointed: frozenset({_R.NoCheckpointYet, _R.CheckpointSaved}),
    ConditionType.Succeeded: frozenset({_R.AdapterWritten, _R.InProgress}),
    # Failed says why: the training, the retries, or what made the job unrunnable.
    ConditionType.Failed: frozenset({_R.TrainingFailed, _R.BackoffLimitExceeded, _R.InProgress, _R.InvalidSpec,
                                     _R.ModelSizeUnknown, _R.NoAcceptableChoice}),
    ConditionType.Suspended: frozenset({_R.SuspendedByUser, _R.NotSuspended}),
}


class Condition(KindCondition[ConditionType, ConditionReason]):
    """A metav1.Condition."""


class PlacementStatus(StatusModel):
    """Where the job runs (or waits to run) and why."""
    attempt: int = Field(description="1 for the first placement; +1 on every fallback.")
    choice: str
    vendor: str
    product: str
    accelerator: str = Field(description="Display, e.g. 'NVIDIA H100 80GB x16'.")
    pool: Optional[str] = None
    workers: int
    devices_per_worker: int
    data_parallel: DataParallel = Field(
        DataParallel.replicated,
        description="How the ranks share the model: replicated (DDP, a full copy per device; chosen when it fits) "
                    "or sharded (FSDP2 over all ranks, when a copy does not fit one device).")
    world_size: Optional[int] = Field(None, description="Training processes: one per device, workers x devicesPerWorker.")
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute activations in backward, as the sizing resolved it for this placement "
                    "(spec.training.gradientCheckpointing, or automatic: off when the memory without it fits); "
                    "the reason says why. Placements recorded before this field: true, the default then.")
    resource_name: Optional[str] = None
    ray_job_name: str
    price_per_device_hour: float = 0.0
    waiting: bool = False
    reason: str = Field(description="Why this choice.")
    since: datetime


class Estimate(StatusModel):
    """Before start: memory, duration and cost of the chosen placement."""
    memory_per_device_gib: float = Field(alias="memoryPerDeviceGiB")
    tokens: Optional[int] = None
    tokens_per_second: Optional[float] = None
    duration_seconds: Optional[float] = None
    cost_usd: Optional[float] = Field(None, alias="costUSD")
    note: Optional[str] = None


class ProgressStatus(StatusModel):
    step: int = 0
    total_steps: Optional[int] = None
    epoch: float = 0.0
    loss: Optional[float] = None
    eval_loss: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    precision: Optional[Precision] = Field(None, description="What the worker trains in: spec.training.precision, or fp32 on a CPU without native bf16 (the message says why).")
    world_size: Optional[int] = Field(None, description="Training processes the worker runs (one per device), as it reports them.")
    data_parallel: Optional[DataParallel] = Field(None, description="What the worker did: replicated (DDP) or sharded (FSDP2).")
    summary: str = Field("", description="e.g. '45% (450/1000)'.")
    eta: Optional[str] = Field(None, description="e.g. '1h20m', or '~3h (est)' before training starts.")


class CheckpointStatus(StatusModel):
    uri: str
    step: int
    time: datetime


class ArtifactStatus(StatusModel):
    uri: str
    base_model: str
    method: str
    rank: int
    digest: Optional[str] = None


class UsageStatus(StatusModel):
    """Accelerator time consumed so far, over every attempt: devices x wall time of each attempt
    (from its worker pods all bound to nodes to the RayJob's endTime), times the price per
    device-hour (docs/sizing.md)."""
    accelerator_seconds: float = Field(0.0, description="Device-seconds so far (devices x seconds), every attempt.")
    accelerator_hours: float = 0.0
    cost_usd: float = Field(0.0, alias="costUSD")
    prior_accelerator_hours: float = Field(0.0, description="Hours of finished attempts.")
    prior_cost_usd: float = Field(0.0, alias="priorCostUSD")
    attempt_start_time: Optional[datetime] = Field(
        None, description="When the current attempt's worker pods all held their devices (billing starts); kept after the RayJob is deleted.")
    attempt_seconds: float = Field(0.0, description="Wall seconds of the current attempt observed so far (never goes down).")
    projected_cost_usd: Optional[float] = Field(
        None, alias="projectedCostUSD",
        description="Spent so far + the remaining tokens at the measured tokens/s; the estimate before a rate is measured.")
    cost: str = Field("", description="e.g. '$1.20 of ~$42', '$0.46' when finished (2 significant digits under $1).")


class FineTuneJobStatus(StatusModel):
    phase: Phase = Phase.Pending
    observed_generation: Optional[int] = None
    message: Optional[str] = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    placement: Optional[PlacementStatus] = None
    rejected_choices: list[ChoiceRejection] = Field(default_factory=list)
    estimate: Optional[Estimate] = None
    progress: Optional[ProgressStatus] = None
    last_checkpoint: Optional[CheckpointStatus] = None
    artifact: Optional[ArtifactStatus] = None
    usage: Optional[UsageStatus] = None
    start_time: Optional[datetime] = None
    completion_time: Optional[datetime] = None
    restarts: int = Field(0, description="Failed runs of the Ray job that KubeRay retried (the RayJob's status.failed); "
                                         "spec.backoffLimit caps them, each resumes from the last checkpoint.")

    def condition(self, type_: ConditionType) -> Optional[Condition]:
        return next((c for c in self.conditions if c.type == type_), None)
