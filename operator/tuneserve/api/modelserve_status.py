"""ModelServe status: what `kubectl get ms` and `kubectl describe ms` show.

Written only by the operator. Condition types and reasons are closed sets of their own (a
ModelServe never "succeeds"; it is Ready or not). Display strings (``replicas.summary``,
``adapterSummary``, ``cost``) exist because a printer column shows one JSONPath.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Optional

from pydantic import Field

from tuneserve.api.conditions import ChoiceRejection, KindCondition, Reason, StatusModel


class ServePhase(str, Enum):
    Pending = "Pending"        # accepted, not placed, or no replica yet
    Waiting = "Waiting"        # placed on an accelerator that is busy now
    Deploying = "Deploying"    # Ray cluster / Serve application starting
    Ready = "Ready"            # the endpoint answers; every usable adapter loaded
    Degraded = "Degraded"      # the endpoint answers, but something is missing (see Degraded)
    Failed = "Failed"          # cannot serve (invalid spec, no acceptable accelerator, app or replica failed)


class ServeConditionType(str, Enum):
    Accepted = "Accepted"            # spec understood, model size known
    Placed = "Placed"                # an accelerator choice was made
    Ready = "Ready"                  # the endpoint serves the base model
    AdaptersReady = "AdaptersReady"  # every listed adapter is loaded on every ready replica
    Degraded = "Degraded"            # serving, but fewer replicas or adapters than wanted
    Upgrading = "Upgrading"          # a base model / engine change is rolling out on a new cluster


class ServeConditionReason(Reason):
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
    # Ready
    NotPlaced = "NotPlaced"
    RayServiceStarting = "RayServiceStarting"
    ApplicationDeploying = "ApplicationDeploying"
    ApplicationFailed = "ApplicationFailed"
    NoReadyReplicas = "NoReadyReplicas"
    NotInService = "NotInService"            # replicas report ready, but no Ready pod backs the Service yet
    ReplicaFailed = "ReplicaFailed"          # no replica serves; the newest one's engine failed (message: why)
    ScaledToZero = "ScaledToZero"
    Serving = "Serving"
    # AdaptersReady
    NoAdapters = "NoAdapters"
    AdaptersPending = "AdaptersPending"
    AdaptersLoading = "AdaptersLoading"
    AdaptersFailed = "AdaptersFailed"
    AllAdaptersLoaded = "AllAdaptersLoaded"
    # Degraded
    AsDesired = "AsDesired"
    ReplicasUnavailable = "ReplicasUnavailable"
    AdaptersUnavailable = "AdaptersUnavailable"
    ApplicationUnhealthy = "ApplicationUnhealthy"
    # Upgrading
    NoUpgrade = "NoUpgrade"
    NewClusterStarting = "NewClusterStarting"

    @classmethod
    def warnings(cls) -> frozenset[Reason]:
        return frozenset({
            cls.InvalidSpec, cls.ModelSizeUnknown, cls.NoAcceptableChoice, cls.SecretNotFound, cls.ReferenceNotFound, cls.FellBack,
            cls.ApplicationFailed, cls.AdaptersFailed, cls.ReplicasUnavailable, cls.AdaptersUnavailable,
            cls.ApplicationUnhealthy, cls.ReplicaFailed,
        })

    @classmethod
    def quiet_when_new(cls) -> frozenset[Reason]:
        return frozenset({
            cls.AsDesired, cls.NoUpgrade, cls.NoAdapters, cls.NotPlaced, cls.Placing,
        })


_R = ServeConditionReason
# The reasons each condition type may carry (KubeRay's style: reasons belong to their type).
REASONS: dict[ServeConditionType, frozenset[ServeConditionReason]] = {
    ServeConditionType.Accepted: frozenset({_R.SpecValid, _R.InvalidSpec, _R.ModelSizeUnknown, _R.SecretNotFound,
                                            _R.ReferenceNotFound}),
    ServeConditionType.Placed: frozenset({_R.Placing, _R.FitsNow, _R.WaitingForCapacity, _R.FellBack, _R.NoAcceptableChoice}),
    ServeConditionType.Ready: frozenset({_R.NotPlaced, _R.RayServiceStarting, _R.ApplicationDeploying, _R.ApplicationFailed,
                                         _R.NoReadyReplicas, _R.NotInService, _R.ReplicaFailed, _R.ScaledToZero, _R.Serving}),
    ServeConditionType.AdaptersReady: frozenset({_R.NoAdapters, _R.AdaptersPending, _R.AdaptersLoading, _R.AdaptersFailed,
                                                 _R.AllAdaptersLoaded}),
    ServeConditionType.Degraded: frozenset({_R.AsDesired, _R.ReplicasUnavailable, _R.AdaptersUnavailable,
                                            _R.ApplicationUnhealthy}),
    ServeConditionType.Upgrading: frozenset({_R.NoUpgrade, _R.NewClusterStarting}),
}


class ServeCondition(KindCondition[ServeConditionType, ServeConditionReason]):
    """A metav1.Condition with ModelServe's types and reasons."""


class AdapterState(str, Enum):
    Pending = "Pending"    # not usable yet (FineTuneJob not Succeeded) or not picked up by replicas yet
    Loading = "Loading"    # loaded on some ready replicas, not all
    Loaded = "Loaded"      # loaded on every ready replica: requests for it are answered
    Failed = "Failed"      # cannot be served (base model mismatch, rank too high, load error)


class AdapterStatus(StatusModel):
    """One listed adapter."""
    name: str
    source: str = Field(description="'FineTuneJob fin-v1' or the URI as written.")
    uri: Optional[str] = Field(None, description="Where the replicas load it from (resolved).")
    state: AdapterState
    message: str = ""
    since: Optional[datetime] = Field(None, description="When the state last changed.")


class ReplicaStatus(StatusModel):
    ready: int = 0
    desired: int = 0
    min: int = 0
    max: int = 0
    summary: str = Field("", description="ready/desired, e.g. '2/4'.")


class ServePlacementStatus(StatusModel):
    """Where the replicas run (or wait to run) and why."""
    attempt: int = Field(description="1 for the first placement; +1 on every fallback.")
    choice: str
    vendor: str
    product: str
    accelerator: str = Field(description="Display, e.g. 'NVIDIA H100 80GB x1 per replica'.")
    pool: Optional[str] = None
    tensor_parallel_size: int = Field(description="Devices per replica.")
    tensor_parallel_auto: bool = Field(False, description="Chosen from model size and device memory.")
    resource_name: Optional[str] = None
    ray_service_name: str
    price_per_device_hour: float = 0.0
    memory_per_device_gib: Optional[float] = Field(None, alias="memoryPerDeviceGiB", description="Estimated need per device (weights, LoRA slots, one sequence of KV cache, overhead).")
    waiting: bool = False
    reason: str = Field(description="Why this choice.")
    since: datetime


class ModelServeStatus(StatusModel):
    phase: ServePhase = ServePhase.Pending
    observed_generation: Optional[int] = None
    message: Optional[str] = None
    endpoint: Optional[str] = Field(None, description="OpenAI-compatible base URL, e.g. http://fin-openai.bank.svc.cluster.local:8000/v1.")
    served_model_name: Optional[str] = None
    conditions: list[ServeCondition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    replicas: Optional[ReplicaStatus] = None
    adapters: list[AdapterStatus] = Field(default_factory=list)
    adapter_summary: str = Field("", description="loaded/listed, e.g. '1/2'.")
    placement: Optional[ServePlacementStatus] = None
    rejected_choices: list[ChoiceRejection] = Field(default_factory=list)
    cost_per_hour_usd: float = Field(0.0, alias="costPerHourUSD", description="Running replicas x devices per replica x price per device-hour.")
    cost: str = Field("", description="e.g. '$7.00/h'.")

    def condition(self, type_: ServeConditionType) -> Optional[ServeCondition]:
        return next((c for c in self.conditions if c.type == type_), None)

    def adapter(self, name: str) -> Optional[AdapterStatus]:
        return next((a for a in self.adapters if a.name == name), None)
