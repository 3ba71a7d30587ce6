"""Fallback: when a placed choice's pods stay unschedulable past the timeout, move on to the next
choice (both kinds; the history is status.rejectedChoices with code TimedOut); and at once when the
choice's run failed while its workers were unschedulable (its pool was lost: ``pool_lost``)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Generic, Iterable, Mapping, Optional, TypeVar

from tuneserve.api.conditions import ChoiceRejection, RejectionCode
from tuneserve.core.scheduling.pods import pod_condition, transition_time
from tuneserve.core.sizing.model import format_duration

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
        if (pod.get("status") or {}).get("phase") not in (None, "Pending"):
            continue
        cond = pod_condition(pod, "PodScheduled")
        stamp = transition_time(cond)
        if cond.get("status") == "False" and cond.get("reason") == "Unschedulable" and stamp is not None:
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


def fall_back(choice: str, attempt: int, since: Optional[datetime], timeout: timedelta, now: datetime,
              history: Mapping[str, str], decide: Callable[[Mapping[str, str]], D]) -> Optional[Placing[D]]:
    """The fallback step of a recorded placement (``choice``, ``attempt``), for either kind: past the
    timeout, decide again (``decide``) with the choice added to the timed-out ``history`` and record
    it (status.rejectedChoices, code TimedOut); before it, plan again at the deadline; None when the
    pods are not unschedulable."""
    verdict = fallback_verdict(choice, since, timeout, now)
    if verdict.move_on:
        assert verdict.reason is not None
        timed_out = ChoiceRejection(choice=choice, code=RejectionCode.TimedOut, message=verdict.reason, at=now)
        return Placing(attempt + 1, decide({**history, choice: verdict.reason}), verdict.reason, (timed_out,))
    if verdict.deadline is not None:
        return Placing(attempt, requeue_after=max(1.0, (verdict.deadline - now).total_seconds()))
    return None


def pool_lost(choice: str, attempt: int, since: datetime, now: datetime, history: Mapping[str, str],
              decide: Callable[[Mapping[str, str]], D]) -> Placing[D]:
    """The run of a recorded placement failed while its worker pods were unschedulable (since
    ``since``): the pool that held them is gone (a lost node, a relabelled pool), so the failure is
    the pool's, not the training's. Move on now, as past the timeout: the failed run's cluster and
    its pending pods are deleted soon after, and with them what shows the pool was lost."""
    reason = (f"{choice}: the run failed while its worker pods were unschedulable (since {since.isoformat()}): "
              "its pool no longer holds them; moved on to the next choice")
    timed_out = ChoiceRejection(choice=choice, code=RejectionCode.TimedOut, message=reason, at=now)
    return Placing(attempt + 1, decide({**history, choice: reason}), reason, (timed_out,))
