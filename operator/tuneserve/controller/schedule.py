"""When each object is planned again without an event on the object itself.

What a plan reads also changes without such an event: a child's status (RayJob, RayService, the
progress and serve-status ConfigMaps, pods going unschedulable) and, for an object still
Pending or Waiting, the capacity other workloads free. So:

- a child's event wakes its owner: planned again at the next tick, yet no sooner than ``react``
  seconds after its last plan (a worker reporting progress every second does not turn into a
  status write every second);
- a Pending object (placed, its pods not bound yet) is planned every ``react`` seconds;
- a Waiting object (no choice fits now) is planned when capacity may have freed
  (``capacity_freed``: a pod finished or went away, a node changed what it offers, a placed object
  finished), no sooner than ``react`` after its last plan; else at the resync. Polling them every
  few seconds instead made the waiting jobs most of the operator's CPU at rest (300 jobs, two
  thirds of them waiting: 14% of a core);
- a plan's ``requeue_after`` (a fallback deadline, a missing Secret) is honoured when sooner;
- an object blocked on a missing ServiceAccount, PersistentVolumeClaim or PriorityClass
  (``Plan.waiting_for``) is woken by that object's event (``appeared``), like a child's;
- every object is planned at least every ``resync`` seconds: the safety net for a missed event.

``TUNESERVE_RESYNC_SECONDS`` sets the resync at startup (the chart's ``resyncSeconds``, 60 s;
``react`` is 3 s, or the resync when shorter). The wake-ups are what let the resync be 60 s
without a settled object reacting slower to its children. The resync loop (resync.py) looks every
``tick`` seconds (1 s; a shorter resync is raised to it) and plans only the objects that are due.
"""
from __future__ import annotations

import threading
from typing import Hashable, Iterable, Optional


DEFAULT_RESYNC_SECONDS = 60.0
REACT_SECONDS = 3.0


class Schedule:
    def __init__(self, resync_seconds: float = DEFAULT_RESYNC_SECONDS, tick_seconds: float = 1.0):
        self.tick = tick_seconds
        self.resync = self.react = tick_seconds
        self._next: dict[Hashable, float] = {}
        self._last: dict[Hashable, float] = {}
        self._waiting: dict[Hashable, frozenset[tuple]] = {}   # key -> (kind, namespace, name) it is blocked on
        self._for_capacity: set[Hashable] = set()   # keys whose last plan found no choice that fits now
        self._guard = threading.Lock()
        self.set_resync(resync_seconds)

    def set_resync(self, resync_seconds: float) -> None:
        """The resync (never below the tick) and ``react`` (3 s, or the resync when shorter)."""
        self.resync = max(resync_seconds, self.tick)
        self.react = min(REACT_SECONDS, self.resync)

    def due(self, key: Hashable, now: float) -> bool:
        """Never planned, or its time has come (``now``: a monotonic clock)."""
        with self._guard:
            return now >= self._next.get(key, 0.0)

    def due_keys(self, now: float) -> list[Hashable]:
        """Every key whose time has come (woken, requeued or at its resync)."""
        with self._guard:
            return [key for key, at in self._next.items() if now >= at]

    def planned(self, key: Hashable, now: float, requeue_after: Optional[float], settled: bool = True,
                for_capacity: bool = False) -> None:
        """Planned at ``now``. ``settled``: only its own and its children's events can change its plan
        (not Pending). ``for_capacity``: Waiting, so ``capacity_freed`` wakes it."""
        wait = self.resync if settled or for_capacity else self.react
        if requeue_after is not None:
            wait = min(wait, requeue_after)
        with self._guard:
            self._last[key] = now
            self._next[key] = now + wait
            if for_capacity:
                self._for_capacity.add(key)
            else:
                self._for_capacity.discard(key)

    def capacity_freed(self) -> None:
        """Capacity may have freed: wake every object waiting for it."""
        with self._guard:
            keys = list(self._for_capacity)
        for key in keys:
            self.wake(key)

    def wake(self, key: Hashable) -> None:
        """A child of ``key`` changed: plan it at the next tick, but not sooner than ``react`` after its
        last plan."""
        with self._guard:
            last = self._last.get(key)
            soon = 0.0 if last is None else last + self.react
            self._next[key] = min(self._next.get(key, soon), soon)

    def wake_namespace(self, plural: str, namespace: str) -> None:
        """Something every ``plural`` object of ``namespace`` may read changed (a FineTuneJob that
        ModelServes take adapters from): wake each of them (keys are (plural, namespace, name))."""
        with self._guard:
            keys = [k for k in self._last if isinstance(k, tuple) and k[:2] == (plural, namespace)]
        for key in keys:
            self.wake(key)

    def wait_for(self, key: Hashable, refs: Iterable[tuple]) -> None:
        """``key`` is blocked on these (kind, namespace, name) objects (none: not blocked)."""
        refs = frozenset(refs)
        with self._guard:
            if refs:
                self._waiting[key] = refs
            else:
                self._waiting.pop(key, None)

    def appeared(self, ref: tuple) -> None:
        """An object (kind, namespace, name) changed: wake whoever is blocked on it."""
        with self._guard:
            keys = [key for key, refs in self._waiting.items() if ref in refs]
        for key in keys:
            self.wake(key)

    def forget(self, key: Hashable) -> None:
        with self._guard:
            self._next.pop(key, None)
            self._last.pop(key, None)
            self._waiting.pop(key, None)
            self._for_capacity.discard(key)
