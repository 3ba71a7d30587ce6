"""One thread plans the objects the schedule (schedule.py) says are due.

kopf timers would do it per object, but a timer needs a finalizer on every object (an object
deleted while the operator is down then stays Terminating) and wakes every object every tick
(1,000 objects: 1,000 wake-ups a second to learn that nothing is due). Here one loop asks the
schedule which keys are due and hands each to ``plan_due``; events still reach kopf's handlers.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Hashable, Optional

from tuneserve.controller.schedule import Schedule

log = logging.getLogger(__name__)


class ResyncLoop:
    def __init__(self, schedule: Schedule, plan_due: Callable[[Hashable], None]):
        self.schedule = schedule
        self.plan_due = plan_due
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tuneserve-resync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self, now: float) -> int:
        """Plan every key due at ``now``; how many were planned. A failing plan is logged and
        stays scheduled (the reconcile reschedules it before raising)."""
        keys = self.schedule.due_keys(now)
        for key in keys:
            if self._stop.is_set():
                break
            try:
                self.plan_due(key)
            except Exception as exc:   # noqa: BLE001  (one object's failure must not stop the loop)
                log.warning("planning %s failed: %s", key, exc)
        return len(keys)

    def _run(self) -> None:
        while not self._stop.wait(self.schedule.tick):
            self.run_once(time.monotonic())
