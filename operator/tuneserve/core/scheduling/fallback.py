"""Fallback: when a placed choice's pods stay unschedulable past the timeout, move on to the next
choice (both kinds; the history is status.rejectedChoices with code TimedOut)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Iterable, Mapping, Optional, TypeVar

from tuneserve.api.conditions import ChoiceRejection, RejectionCode
from tuneserve.core.sizing import format_duration

D = TypeVar("D")


@dataclass(frozen=True)
class FallbackVerdict:
    move_on: bool
    reason: Optional[str] = None
    deadline: Optional[datetime] = None


def fallback_verdict(candidate_key: str, unschedulable_since: Optional[datetime], timeout: timedelta,
                     now: datetime) -> FallbackVerdict:
    """Whether to give up on a placed choice whose pods have been unschedulable since
    ``unschedulable_since`` (None: all pods scheduled). The reason is recorded in the history
    (status.rejectedChoices, code TimedOut) and passed back to ``decide_placement``."""
    if unschedulable_since is None:
        return FallbackVerdict(False)
    deadline = unschedulable_since + timeout
    if now < deadline:
        return FallbackVerdict(False, deadline=deadline)
    waited = format_duration((now - unschedulable_since).total_seconds())
    return FallbackVerdict(True, f"{candidate_key}: pods unschedulable for {waited} "
                                 f"(since {unschedulable_since.isoformat()}, timeout {format_duration(timeout.total_seconds())}); "
                                 "moved on to the next choice", deadline)


def unschedulable_since(pods: Iterable[Mapping[str, Any]]) -> Optional[datetime]:
    """Earliest time any pending pod was marked unschedulable (PodScheduled=False,
    reason Unschedulable); None when no pod is unschedulable now."""
    times = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "Pending"):
            continue
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                stamp = cond.get("lastTransitionTime")
                if isinstance(stamp, str):
                    stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                if stamp is not None:
                    times.append(stamp)
    return min(times) if times else None


@dataclass(frozen=True)
class Placing(Generic[D]):
    """What placement decided in one reconcile, for either kind (``decision`` None: the recorded
    placement stands)."""
    attempt: int
    decision: Optional[D] = None
    fallback_reason: Optional[str] = None
    timed_out: tuple[ChoiceRejection, ...] = ()
    requeue_after: Optional[float] = None


def timed_out_rejection(choice: str, verdict: FallbackVerdict, now: datetime) -> ChoiceRejection:
    """The history entry of a choice given up on (status.rejectedChoices, code TimedOut)."""
    return ChoiceRejection(choice=choice, code=RejectionCode.TimedOut, message=verdict.reason or "", at=now)


def requeue_until(attempt: int, verdict: FallbackVerdict, now: datetime) -> Placing:
    """No fallback yet, but one is due at the verdict's deadline: keep the attempt, plan again then."""
    assert verdict.deadline is not None
    return Placing(attempt, requeue_after=max(1.0, (verdict.deadline - now).total_seconds()))
