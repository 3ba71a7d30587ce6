"""The vLLM engine processes' stdout and stderr, passed through and remembered.

vLLM runs the engine in child processes (EngineCore, then one Worker per device), which inherit
this process's stdout and stderr. While they are spawned, ``EngineOutput.capture()`` points fds 1
and 2 at pipes, so the children keep writing into them for their whole life; a thread per pipe
copies everything on to the original fd (the pod log is unchanged) and keeps the last
``keep_bytes``, which ``failure.failure_cause`` reads when the engine fails. The window also sets
``PYTHONFAULTHANDLER`` for the children: a worker killed by a signal (SIGILL, SIGSEGV, ...) then
prints which signal and where, where otherwise it dies without a word.

Outside the window this process's own fds are its own again.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

FAULTHANDLER_ENV = "PYTHONFAULTHANDLER"


class EngineOutput:
    def __init__(self, keep_bytes: int = 64 * 1024):
        self.keep_bytes = keep_bytes
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def text(self) -> str:
        """What the engine processes printed last (up to ``keep_bytes``)."""
        with self._lock:
            return self._tail.decode(errors="replace")

    def wait_closed(self, timeout: float) -> bool:
        """Wait until every process that writes into the pipes has exited (or ``timeout``
        seconds); True when all output has been read."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Processes started inside this block write into the pipes; fds 1 and 2 are restored
        on exit, and ``PYTHONFAULTHANDLER`` to what it was."""
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        env_before = os.environ.get(FAULTHANDLER_ENV)
        os.environ[FAULTHANDLER_ENV] = "1"
        try:
            for fd, original in saved.items():
                read_end, write_end = os.pipe()
                os.dup2(write_end, fd)
                os.close(write_end)
                self._pump(read_end, os.dup(original))
            yield
        finally:
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
            if env_before is None:
                os.environ.pop(FAULTHANDLER_ENV, None)
            else:
                os.environ[FAULTHANDLER_ENV] = env_before

    def _pump(self, read_end: int, sink: int) -> None:
        thread = threading.Thread(target=self._copy, args=(read_end, sink), daemon=True,
                                  name=f"engine-output-{sink}")
        thread.start()
        self._threads.append(thread)

    def _copy(self, read_end: int, sink: int) -> None:
        """Until every writer is gone: forward each chunk, remember the tail. Never raises, so
        the engine can never block on a full pipe because this thread died."""
        try:
            while chunk := os.read(read_end, 65536):
                self._remember(chunk)
                with contextlib.suppress(OSError):
                    _write_all(sink, chunk)
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(sink)

    def _remember(self, chunk: bytes) -> None:
        with self._lock:
            self._tail += chunk
            if len(self._tail) > self.keep_bytes:
                del self._tail[:len(self._tail) - self.keep_bytes]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
