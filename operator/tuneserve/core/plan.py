"""A reconcile as a pure plan, for both kinds: what to apply, patch or delete, which status to
write, which events to post. The controller (tuneserve.controller) carries it out; the planners
(``finetunejob.reconcile``, ``modelserve.reconcile``) never talk to the API."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from pydantic import ValidationError

# A referenced Secret or key is missing: plan again this soon (it may be created any moment).
BLOCKED_REQUEUE_SECONDS = 10.0


@dataclass
class Event:
    type: str          # Normal | Warning
    reason: str
    message: str


@dataclass
class JsonPatch:
    """A JSON patch of an object the operator does not render (e.g. a RayCluster KubeRay made).
    Its ``test`` ops may fail when the object changed meanwhile; ``event`` is posted only when
    the patch applied."""
    api_version: str
    kind: str
    name: str
    ops: list[dict[str, Any]]
    event: Optional[Event] = None


@dataclass
class Plan:
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str, str]] = field(default_factory=list)   # (apiVersion, kind, name)
    patch: list[JsonPatch] = field(default_factory=list)
    status: Optional[dict[str, Any]] = None
    events: list[Event] = field(default_factory=list)
    requeue_after: Optional[float] = None
    # (kind, name) of the missing objects the owner is blocked on (core/references.py): their
    # events wake it (controller/schedule.py); Secrets are not watched, the requeue finds them.
    waiting_for: list[tuple[str, str]] = field(default_factory=list)


def readable(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def missing_secrets(children: list[dict[str, Any]], secrets: Mapping[str, frozenset[str]],
                    fields: Optional[Mapping[tuple[str, str], str]] = None) -> Optional[str]:
    """What is wrong with the Secrets the children reference (``secrets``: the namespace's Secrets'
    key names, from the index), or None when every referenced key exists. ``fields``: the spec
    field of each (name, key), named first ("spec.credentials.huggingFaceToken: ...")."""
    problems = []
    for name, key in sorted(set(secret_refs(children))):
        keys = secrets.get(name)
        where = f"{fields[(name, key)]}: " if fields and (name, key) in fields else ""
        if keys is None:
            problems.append(f"{where}Secret {name!r} not found")
        elif key not in keys:
            problems.append(f"{where}Secret {name!r} has no key {key!r}")
    return "; ".join(problems) or None


def condition_events(previous: Any, new: Any) -> list[Event]:
    """One Event per condition transition (status or reason changed), for any of our statuses; its
    type is the reason's severity (each kind's reason enum says which reasons are warnings)."""
    events = []
    for cond in new.conditions:
        before = previous.condition(cond.type) if previous else None
        status, reason = cond.status.value, cond.reason.value
        if before is not None and (before.status.value, before.reason.value) == (status, reason):
            continue
        if before is None and status != "True" and cond.reason.quiet:
            continue
        events.append(Event(cond.reason.severity.value, reason,
                            f"{cond.type.value}={status}: {cond.message}"[:1024]))
    return events


def finish(plan: Plan, status: Any, previous: Any, patch: Callable[[Any, Any], Optional[dict]]) -> Plan:
    """Write the status only when it changed, with an Event per condition transition."""
    plan.status = patch(previous.to_wire() if previous else None, status)
    if plan.status is not None:
        plan.events.extend(condition_events(previous, status))
    return plan


def secret_refs(objs: Iterable[Any]) -> Iterator[tuple[str, str]]:
    """Every (secret name, key) that rendered objects reference through secretKeyRef."""
    for obj in objs:
        if isinstance(obj, Mapping):
            ref = obj.get("secretKeyRef")
            if isinstance(ref, Mapping):
                yield ref["name"], ref["key"]
            yield from secret_refs(obj.values())
        elif isinstance(obj, list):
            yield from secret_refs(obj)
