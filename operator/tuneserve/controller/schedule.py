"""When each object is planned again without an event: ``Plan.requeue_after`` when the planner
asked for one (a fallback deadline, a missing Secret), else after the resync interval.

The resync is the safety net for what arrives without an event on the object itself: a child's
status (RayJob, RayService, the progress and serve-status ConfigMaps), pods becoming
unschedulable, nodes freeing capacity. ``TUNESERVE_RESYNC_SECONDS`` sets it (the chart's
``resyncSeconds``, 3 s: a RayJob's progress shows in the status within that). A timer ticks
every ``tick`` seconds (1 s, or the resync when shorter) and plans only the objects that are due,
so a requeue sooner than the resync is honoured, and a longer resync still meets every deadline a
plan asked for.
"""
from __future__ import annotations

import threading
from typing import Optional


class Schedule:
    def __init__(self, resync_seconds: float, tick_seconds: float = 1.0):
        self.resync = resync_seconds
        self.tick = min(tick_seconds, resync_seconds)
        self._next: dict[str, float] = {}
        self._guard = threading.Lock()

    def due(self, uid: str, now: float) -> bool:
        """Planned never, or its requeue or resync time has come (``now``: a monotonic clock)."""
        with self._guard:
            return now >= self._next.get(uid, 0.0)

    def planned(self, uid: str, now: float, requeue_after: Optional[float]) -> None:
        """Planned at ``now``: next at the plan's requeue, if sooner than the resync."""
        wait = self.resync if requeue_after is None else min(self.resync, requeue_after)
        with self._guard:
            self._next[uid] = now + wait

    def forget(self, uid: str) -> None:
        with self._guard:
            self._next.pop(uid, None)
