"""glibc's allocator, told to give memory back (issue 15: RSS at 1,000 objects at rest).

Each thread that allocates (kopf's handler pool, the resync loop) gets its own malloc arena, and
glibc keeps what a burst of reconciles freed (the first listing of 1,000 objects) in each of them,
so RSS stays at the burst's high-water mark. Fewer arenas and a periodic ``malloc_trim`` hand the
free pages back. Without glibc (musl, macOS) both are no-ops.
"""
from __future__ import annotations

import ctypes
import logging
import time
from typing import Optional

M_ARENA_MAX = -8   # mallopt parameter (malloc.h)
TRIM_EVERY_SECONDS = 60.0

log = logging.getLogger(__name__)


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _glibc()


def limit_arenas(arenas: int = 2) -> None:
    """At most ``arenas`` malloc arenas for the whole process; call before threads start."""
    if _LIBC is not None and not _LIBC.mallopt(M_ARENA_MAX, arenas):
        log.warning("mallopt(M_ARENA_MAX, %d) failed", arenas)


class Trimmer:
    """Returns freed heap pages to the OS at most every ``every`` seconds (a few ms each time)."""

    def __init__(self, every: float = TRIM_EVERY_SECONDS):
        self.every = every
        self._last = time.monotonic()

    def maybe_trim(self, now: float) -> bool:
        if _LIBC is None or now - self._last < self.every:
            return False
        self._last = now
        _LIBC.malloc_trim(0)
        return True
