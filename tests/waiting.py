"""The one polling loop of the tests and the dev tooling (tests/kube.py, tests/worker helpers,
hack/localcluster.py's wait_until): call ``fn`` until it returns something truthy, and return that.

Standard library only, so every caller can import it: the tests with tests/ on sys.path, hack/
scripts by putting tests/ there themselves.
"""
from __future__ import annotations

import time
from typing import Any, Callable


class WaitTimeout(AssertionError):
    pass


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.25, *,
             retry: tuple[type[BaseException], ...] = (), fatal: tuple[type[BaseException], ...] = (),
             error: Callable[[str], BaseException] = WaitTimeout, on_timeout: Callable[[], str] = lambda: "") -> Any:
    """Polls ``fn`` every ``interval`` seconds until it returns something truthy (at least once, and
    once more at the deadline). Exceptions in ``retry`` (not in ``fatal``) mean "not yet"; others
    propagate. After ``timeout``, raises ``error`` naming ``what``, the last value or exception seen,
    and ``on_timeout()``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except fatal:
            raise
        except retry as exc:
            last = exc
        if time.monotonic() >= deadline:
            seen = f" (last error: {last})" if isinstance(last, BaseException) else \
                (f"; last seen: {last!r}" if last is not None else "")
            raise error(f"timed out after {timeout:.0f}s waiting for {what}{seen}" + on_timeout())
        time.sleep(interval)
