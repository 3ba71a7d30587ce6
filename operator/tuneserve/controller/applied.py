"""What this process applied a moment ago, so a second plan of the same object does not apply the
same children again before the watch has delivered them to the indexes.

A new FineTuneJob is planned on its ADDED event and again on the MODIFIED event of its own status
write, usually before the children just applied reach the child indexes: the planner, reading the
indexes, sees them missing and asks for every one again (a burst of 100 jobs made ~2x the applies).
An apply is skipped when the last apply of that child (by kind and name) was within ``window_s``
and had the same applied hash: a change and its undo inside the window (A, B, A) applies all three.
Past the window the indexes are trusted again, so a child deleted by someone is re-applied at the
next plan after it."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

from tuneserve.core.hashing import APPLIED_HASH_ANNOTATION

RECENT_APPLY_WINDOW_SECONDS = 30.0


def _key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace") or "", meta["name"]


def _hash(obj: Mapping[str, Any]) -> str:
    return (obj["metadata"].get("annotations") or {}).get(APPLIED_HASH_ANNOTATION, "")


class RecentlyApplied:
    """The last apply of each child within the window, by (apiVersion, kind, namespace, name):
    its hash and when; thread-safe (kopf runs sync handlers in a thread pool), bounded by the window."""

    def __init__(self, window_s: float = RECENT_APPLY_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._at: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._at and next(iter(self._at.values()))[1] < now - self.window_s:
            self._at.popitem(last=False)

    def just_applied(self, obj: Mapping[str, Any]) -> bool:
        with self._lock:
            self._expire(self.clock())
            last = self._at.get(_key(obj))
            return last is not None and last[0] == _hash(obj)

    def record(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            key = _key(obj)
            self._at.pop(key, None)
            self._at[key] = (_hash(obj), self.clock())
