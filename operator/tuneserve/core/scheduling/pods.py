"""Reading pods as the pods index slims them (metadata.labels, spec.nodeName, status.phase and
conditions): one place for a condition and its transition time, which fallback, billing and the
ModelServe's Service endpoints all read."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping, Optional


def pod_condition(pod: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    """The pod's condition of ``type_`` (PodScheduled, Ready, ...); {} when it has none."""
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def transition_time(condition: Mapping[str, Any]) -> Optional[datetime]:
    """A condition's lastTransitionTime (an RFC 3339 string from the API, a datetime in tests)."""
    stamp = condition.get("lastTransitionTime")
    if isinstance(stamp, str) and stamp:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return stamp if isinstance(stamp, datetime) else None
