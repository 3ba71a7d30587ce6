"""When each object is planned again without an event on the object itself.

What a plan reads also changes without such an event: a child's status (RayJob, RayService, the
progress and serve-status ConfigMaps, pods going unschedulable) and, for an object still
Pending or Waiting, the capacity other workloads free. So:

- a child's event wakes its owner: planned again at the next tick, yet no sooner than ``react``
  seconds after its last plan (a worker reporting progress every second does not turn into a
  status write every second);
- a Pending or Waiting object is planned every ``react`` seconds (capacity may have freed);
- a plan's ``requeue_after`` (a fallback deadline, a missing Secret) is honoured when sooner;
- every object is planned at least every ``resync`` seconds: the safety net for a missed event.

``TUNESERVE_RESYNC_SECONDS`` sets the resync (the chart's ``resyncSeconds``; ``react`` is 3 s, or
the resync when shorter). With the chart's 3 s every object is planned every 3 s, as before the
wake-ups; they are what lets the resync be raised (e.g. 60 s) without a settled object reacting
slower to its children. A timer ticks every ``tick`` seconds (1 s, or the resync when shorter)
and plans only the objects that are due.
"""
from __future__ import annotations

import threading
from typing import Hashable, Optional


class Schedule:
    def __init__(self, resync_seconds: float, tick_seconds: float = 1.0, react_seconds: float = 3.0):
        self.resync = resync_seconds
        self.tick = min(tick_seconds, resync_seconds)
        self.react = min(react_seconds, resync_seconds)
        self._next: dict[Hashable, float] = {}
        self._last: dict[Hashable, float] = {}
        self._guard = threading.Lock()

    def due(self, key: Hashable, now: float) -> bool:
        """Never planned, or its time has come (``now``: a monotonic clock)."""
        with self._guard:
            return now >= self._next.get(key, 0.0)

    def planned(self, key: Hashable, now: float, requeue_after: Optional[float], settled: bool = True) -> None:
        """Planned at ``now``. ``settled``: only its own and its children's events can change its plan
        (not Pending or Waiting for capacity)."""
        wait = self.resync if settled else self.react
        if requeue_after is not None:
            wait = min(wait, requeue_after)
        with self._guard:
            self._last[key] = now
            self._next[key] = now + wait

    def wake(self, key: Hashable) -> None:
        """A child of ``key`` changed: plan it at the next tick, but not sooner than ``react`` after its
        last plan."""
        with self._guard:
            last = self._last.get(key)
            soon = 0.0 if last is None else last + self.react
            self._next[key] = min(self._next.get(key, soon), soon)

    def forget(self, key: Hashable) -> None:
        with self._guard:
            self._next.pop(key, None)
            self._last.pop(key, None)
