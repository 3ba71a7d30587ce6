"""The one polling loop (tests/waiting.py) that the tests and hack/localcluster.py share."""
from __future__ import annotations

import pytest

from waiting import WaitTimeout, wait_for


def test_returns_the_first_truthy_value():
    values = iter([0, None, "ready"])
    assert wait_for(lambda: next(values), 5, "ready", interval=0) == "ready"


def test_listed_exceptions_mean_not_yet_and_others_propagate():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not up yet")
        return True

    assert wait_for(flaky, 5, "up", interval=0, retry=(ConnectionError,))
    with pytest.raises(KeyError):
        wait_for(lambda: {}["missing"], 5, "never", interval=0, retry=(ConnectionError,))


def test_fatal_exceptions_end_the_wait_even_when_retried():
    class Exited(RuntimeError):
        pass

    def exits():
        raise Exited("component exited")

    with pytest.raises(Exited):
        wait_for(exits, 5, "never", interval=0, retry=(Exception,), fatal=(Exited,))


def test_timeout_names_what_and_the_last_thing_seen():
    with pytest.raises(WaitTimeout, match=r"waiting for the answer; last seen: 0"):
        wait_for(lambda: 0, 0.05, "the answer", interval=0.01)
    with pytest.raises(RuntimeError, match=r"waiting for it \(last error: boom\) tail"):
        wait_for(lambda: (_ for _ in ()).throw(ValueError("boom")), 0.05, "it", interval=0.01,
                 retry=(ValueError,), error=RuntimeError, on_timeout=lambda: " tail")
