"""Status helpers both kinds share: one condition per function (a ``Verdict``), collected by a
``ConditionSet`` that keeps ``lastTransitionTime`` unless the status flipped; the Accepted and
Placed conditions (the same ladder for both kinds); the rejected-choices history; the status to
write only when it changed; the status of a spec that does not parse.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Generic, Iterable, Mapping, Optional, Protocol, Sequence, TypeVar

from tuneserve.api.conditions import PERMANENT_REJECTIONS, ChoiceRejection, ConditionStatus, RejectionCode, StatusModel
from tuneserve.core.plan import Event, Plan
from tuneserve.core.references import Blocked
from tuneserve.core.scheduling.fit import Outcome, Rejection

T, F, U = ConditionStatus.true, ConditionStatus.false, ConditionStatus.unknown
C = TypeVar("C", bound=StatusModel)
R = TypeVar("R", bound=Enum)


@dataclass(frozen=True)
class Verdict(Generic[R]):
    """One condition's status, reason and message, as a condition function returns it."""
    status: ConditionStatus
    reason: R
    message: str = ""


class _Conditions(Protocol):
    def condition(self, type_: Any) -> Any: ...


class ConditionSet(Generic[C]):
    """The conditions of one status being derived. A condition keeps its ``lastTransitionTime``
    from ``previous`` while its status stays the same."""

    def __init__(self, cls: type[C], reasons: Mapping[Any, frozenset], previous: Optional[_Conditions], now: datetime,
                 generation: int):
        self.cls, self.reasons, self.previous, self.now, self.generation = cls, reasons, previous, now, generation
        self.conditions: dict[Any, C] = {}
        self.messages: dict[Any, str] = {}

    def set(self, type_: Enum, verdict: Verdict) -> None:
        if verdict.reason not in self.reasons[type_]:
            raise ValueError(f"reason {verdict.reason.value} does not belong to condition {type_.value}")
        before = self.previous.condition(type_) if self.previous else None
        since = before.last_transition_time if before and before.status == verdict.status else self.now
        self.conditions[type_] = self.cls(type=type_, status=verdict.status, reason=verdict.reason,
                                          message=verdict.message, last_transition_time=since,
                                          observed_generation=self.generation)
        self.messages[type_] = verdict.message

    def message(self, type_: Enum) -> str:
        return self.messages[type_]

    def ordered(self, types: Iterable[Enum]) -> list[C]:
        return [self.conditions[t] for t in types]


class _Placement(Protocol):
    """What the Placed condition reads of a kind's placement status."""
    attempt: int
    waiting: bool
    reason: str


class _Decision(Protocol):
    outcome: Outcome
    reason: str
    rejections: Sequence[Rejection]


def accepted_condition(reasons: type[R], spec_error: Optional[str], spec_error_reason: R,
                       blocked: Optional[Blocked]) -> Verdict[R]:
    if spec_error:
        return Verdict(F, spec_error_reason, spec_error)
    if blocked:
        return Verdict(F, reasons(blocked.reason), blocked.message)
    return Verdict(T, reasons("SpecValid"), "spec is valid and the model size is known")


def placed_condition(reasons: type[R], spec_error: Optional[str], decision: Optional[_Decision],
           placement: Optional[_Placement], fallback_reason: Optional[str]) -> Verdict[R]:
    if spec_error:
        return Verdict(U, reasons("Placing"), "not placed: the spec is not accepted")
    if unplaceable(decision):
        assert decision is not None
        return Verdict(F, reasons("NoAcceptableChoice"), decision.reason)
    if placement is None:
        return Verdict(U, reasons("Placing"), "choosing an accelerator")
    if placement.waiting:
        return Verdict(T, reasons("WaitingForCapacity"), placement.reason)
    if placement.attempt > 1:
        return Verdict(T, reasons("FellBack"), (fallback_reason or "fell back") + "; now: " + placement.reason)
    return Verdict(T, reasons("FitsNow"), placement.reason)


def unplaceable(decision: Optional[_Decision]) -> bool:
    return decision is not None and decision.outcome == Outcome.Unplaceable


def permanent(decision: Optional[_Decision]) -> bool:
    """Every choice was rejected for a reason more or emptier nodes cannot cure."""
    return decision is not None and bool(decision.rejections) and \
        all(r.code in PERMANENT_REJECTIONS for r in decision.rejections)


def merge_rejections(previous: Sequence[ChoiceRejection], fresh: Iterable[Rejection],
                     timed_out: Iterable[ChoiceRejection], now: datetime) -> list[ChoiceRejection]:
    """The rejected-choices history after placement ran again: every TimedOut kept (they steer the
    next placements), then this decision's other rejections, each stamped when first seen."""
    stamp = {(r.choice, r.code): r.at for r in previous}
    history = [r for r in previous if r.code == RejectionCode.TimedOut] + list(timed_out)
    new = [ChoiceRejection(choice=r.choice, code=r.code, message=r.message, at=stamp.get((r.choice, r.code), now))
           for r in fresh if r.code != RejectionCode.TimedOut]
    seen, out = set(), []
    for item in history + new:
        if (item.choice, item.code) not in seen:
            seen.add((item.choice, item.code))
            out.append(item)
    return out


class _Rejected(Protocol):
    rejected_choices: list[ChoiceRejection]


def timed_out_history(status: Optional[_Rejected]) -> dict[str, str]:
    """Candidate keys that timed out before, for the placement's ``timed_out=...``."""
    if status is None:
        return {}
    return {r.choice: r.message for r in status.rejected_choices if r.code == RejectionCode.TimedOut}


def status_patch(previous: Optional[Mapping[str, Any]], new: StatusModel) -> Optional[dict[str, Any]]:
    """The status to write, or None when nothing changed (avoids write churn and event loops)."""
    rendered = new.to_wire()
    if previous and type(new).model_validate(dict(previous)).to_wire() == rendered:
        return None
    return rendered


def invalid_spec(plan: Plan, body: Mapping[str, Any], message: str, now: datetime) -> Plan:
    """A spec that does not parse has no typed status to derive: Failed, Accepted=False InvalidSpec,
    written from the raw body, with a Warning Event."""
    plan.status = {"phase": "Failed", "message": message, "observedGeneration": body["metadata"].get("generation"),
                   "conditions": [{"type": "Accepted", "status": "False", "reason": "InvalidSpec",
                                   "message": message, "lastTransitionTime": now.isoformat()}]}
    plan.events.append(Event("Warning", "InvalidSpec", message))
    return plan
