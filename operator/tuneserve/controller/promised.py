"""The reservations placement subtracts (core/scheduling/reservations.py), kept current within a
burst. The reservation indexes (indexes.py) learn a placement only when the watch delivers the
status that records it, a moment after the write; objects created together are planned within
that moment. So each plan's reservation is also recorded here as soon as it is planned, and
planning is serialized (``planning``), so the next object's plan already sees it."""
from __future__ import annotations

import threading
from typing import Iterable, Optional

from tuneserve.core.scheduling.reservations import OwnerKey, Reservation


class Promised:
    """Reservations this process planned, by owner (None: the owner's last plan reserves nothing),
    over those the indexes hold. An entry lasts until the owner is deleted; the owner's next plan
    replaces it (also after a refused status write: its event plans it again)."""

    def __init__(self) -> None:
        self.planning = threading.Lock()   # held from reading the world to recording the plan's reservation
        self._planned: dict[OwnerKey, Optional[Reservation]] = {}
        self._guard = threading.Lock()

    def record(self, owner: OwnerKey, reservation: Optional[Reservation]) -> None:
        with self._guard:
            self._planned[owner] = reservation

    def forget(self, owner: OwnerKey) -> None:
        with self._guard:
            self._planned.pop(owner, None)

    def merged(self, indexed: Iterable[Reservation]) -> tuple[Reservation, ...]:
        """The indexed reservations, with what this process planned since in their place."""
        with self._guard:
            planned = dict(self._planned)
        out = {r.owner: r for r in indexed if r.owner not in planned}
        out.update({owner: r for owner, r in planned.items() if r is not None})
        return tuple(out[owner] for owner in sorted(out))
