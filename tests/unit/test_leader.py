"""The leader-election rule: who acquires, renews or waits, on literal Lease specs."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tuneserve.controller.leader import Action, ElectionTiming, decide, lease_spec_for

NOW = datetime(2026, 12, 2, 12, 0, 30, tzinfo=timezone.utc)
ME, PEER = "tuneserve-operator-a", "tuneserve-operator-b"


@pytest.mark.parametrize("spec, expected", [
    (None, Action.Acquire),                                                            # no Lease yet
    ({"holderIdentity": "", "renewTime": "2026-12-02T12:00:29.000000Z", "leaseDurationSeconds": 1},
     Action.Acquire),                                                                  # released by its holder
    ({"holderIdentity": PEER, "renewTime": "2026-12-02T12:00:20.000000Z", "leaseDurationSeconds": 15},
     Action.Wait),                                                                     # live peer
    ({"holderIdentity": PEER, "renewTime": "2026-12-02T12:00:15.000000Z", "leaseDurationSeconds": 15},
     Action.Acquire),                                                                  # expired exactly now
    ({"holderIdentity": PEER, "renewTime": "2026-12-02T12:00:00Z", "leaseDurationSeconds": 15},
     Action.Acquire),                                                                  # long expired, no micros
    ({"holderIdentity": PEER, "leaseDurationSeconds": 15}, Action.Acquire),            # never renewed
    ({"holderIdentity": ME, "renewTime": "2026-12-02T12:00:29.000000Z", "leaseDurationSeconds": 15},
     Action.Renew),                                                                    # ours
    ({"holderIdentity": ME, "renewTime": "2026-12-02T11:00:00.000000Z", "leaseDurationSeconds": 15},
     Action.Renew),                                                                    # ours, even if late
])
def test_decide(spec, expected):
    assert decide(spec, ME, NOW) is expected


def test_acquiring_from_a_peer_starts_a_new_term():
    prev = {"holderIdentity": PEER, "renewTime": "2026-12-02T12:00:00Z", "acquireTime": "2026-12-02T11:00:00Z",
            "leaseDurationSeconds": 15, "leaseTransitions": 3}
    spec = lease_spec_for(Action.Acquire, prev, ME, NOW, ElectionTiming(lease_seconds=15))
    assert spec == {"holderIdentity": ME, "leaseDurationSeconds": 15, "renewTime": "2026-12-02T12:00:30.000000Z",
                    "acquireTime": "2026-12-02T12:00:30.000000Z", "leaseTransitions": 4}


def test_first_term_and_renewal_keep_the_transition_count():
    first = lease_spec_for(Action.Acquire, None, ME, NOW, ElectionTiming())
    assert first["leaseTransitions"] == 0 and first["acquireTime"] == first["renewTime"]
    later = NOW.replace(second=35)
    renewed = lease_spec_for(Action.Renew, first, ME, later, ElectionTiming())
    assert renewed["acquireTime"] == first["acquireTime"]
    assert renewed["renewTime"] == "2026-12-02T12:00:35.000000Z" and renewed["leaseTransitions"] == 0
