"""The status primitives both kinds share: the camelCase status base, metav1.Condition typed on
each kind's own closed sets of types and reasons, and why an accelerator choice was rejected.
Each kind's status (``finetunejob_status``, ``modelserve_status``) builds on these."""
from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Generic, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class StatusModel(BaseModel):
    """Status types: camelCase; unknown fields ignored so an older status never breaks parsing."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ConditionStatus(str, Enum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Severity(str, Enum):
    """The type of the Event posted when a condition moves to a reason."""
    Normal = "Normal"
    Warning = "Warning"


class Reason(str, Enum):
    """Base of each kind's condition reasons: the Event a transition posts takes its type and its
    quietness from the enum. A kind names its ``warnings()`` (a person should look) and its
    ``quiet_when_new()`` reasons (initial "not yet" conditions: no Event when they first appear)."""

    @classmethod
    def warnings(cls) -> frozenset[Reason]:
        return frozenset()

    @classmethod
    def quiet_when_new(cls) -> frozenset[Reason]:
        return frozenset()

    @property
    def severity(self) -> Severity:
        return Severity.Warning if self in type(self).warnings() else Severity.Normal

    @property
    def quiet(self) -> bool:
        return self in type(self).quiet_when_new()


TypeT = TypeVar("TypeT", bound=Enum)
ReasonT = TypeVar("ReasonT", bound=Enum)


class KindCondition(StatusModel, Generic[TypeT, ReasonT]):
    """A metav1.Condition whose type and reason are one kind's enums."""
    type: TypeT
    status: ConditionStatus
    reason: ReasonT
    message: str = ""
    last_transition_time: datetime
    observed_generation: Optional[int] = None


class RejectionCode(str, Enum):
    UnknownAccelerator = "UnknownAccelerator"
    InsufficientMemory = "InsufficientMemory"
    Unsupported = "Unsupported"              # e.g. qlora where 4-bit is not supported
    NoMatchingNodes = "NoMatchingNodes"
    InsufficientCapacity = "InsufficientCapacity"  # not even when the cluster is idle
    Busy = "Busy"                            # capacity exists, not free now
    TimedOut = "TimedOut"                    # pods stayed unschedulable past the timeout
    Excluded = "Excluded"                    # auto request: filtered by vendors/min memory/capability


class ChoiceRejection(StatusModel):
    """Why a choice was not used."""
    choice: str = Field(description="The choice, e.g. 'nvidia/h100-80gb 1x8'.")
    code: RejectionCode
    message: str
    at: Optional[datetime] = None


# Rejections a bigger or emptier cluster cannot cure: when every choice fails with one of these, the
# resource fails instead of waiting for nodes. One set for both kinds: Busy, NoMatchingNodes and
# InsufficientCapacity can be cured by nodes, the others cannot. (ModelServe had no Excluded: only a
# FineTuneJob's automatic request excludes accelerators, so adding it changes no ModelServe verdict.)
PERMANENT_REJECTIONS = frozenset({RejectionCode.UnknownAccelerator, RejectionCode.InsufficientMemory,
                                  RejectionCode.Unsupported, RejectionCode.TimedOut, RejectionCode.Excluded})
