"""A child applied a moment ago is not applied again before the watch delivers it, and is again
once the window has passed (a child deleted by someone comes back)."""
from __future__ import annotations

import pytest

from tuneserve.controller.applied import RecentlyApplied
from tuneserve.core.hashing import with_applied_hash


def child(name="j-1", data="a", kind="ConfigMap"):
    return with_applied_hash({"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": "ns"},
                              "data": {"k": data}})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("later, after_s, skipped", [
    (child(), 1, True),                      # the same child, same content, a second later: skip
    (child(), 31, False),                    # past the window: trust the indexes again
    (child(data="b"), 1, False),             # new content: apply
    (child(name="j-2"), 1, False),           # another child
    (child(kind="Secret"), 1, False),        # another kind of the same name
])
def test_recent_apply_is_skipped_only_when_identical_and_recent(later, after_s, skipped):
    clock = Clock()
    recent = RecentlyApplied(window_s=30, clock=clock)
    recent.record(child())
    clock.now += after_s
    assert recent.just_applied(later) is skipped


def test_a_change_and_its_undo_inside_the_window_are_both_applied():
    clock = Clock()
    recent = RecentlyApplied(window_s=30, clock=clock)
    recent.record(child(data="a"))
    clock.now += 1
    assert not recent.just_applied(child(data="b"))
    recent.record(child(data="b"))
    clock.now += 1
    assert not recent.just_applied(child(data="a")), "the live copy is b now: a must be applied again"


def test_entries_expire_so_memory_stays_bounded():
    clock = Clock()
    recent = RecentlyApplied(window_s=30, clock=clock)
    for i in range(100):
        recent.record(child(name=f"j-{i}"))
    clock.now += 31
    assert not recent.just_applied(child(name="j-0"))
    assert len(recent._at) == 0
