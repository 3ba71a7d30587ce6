"""Graceful drain: SIGTERM (pod deletion, spot preemption) ends training on a committed checkpoint.

The handler only sets a flag; the loop reads it between steps and all ranks agree on it (loop.py:
one all-reduce per step), so every rank stops after the same step and the checkpoint's collectives
line up. The checkpoint goes through the normal atomic path (checkpoint.py) with ``drained`` in its
marker's meta, which is how the driver tells a drain from a failure (main.py, exit status 3).

Where the handler lives: the process that runs the loop. Under Ray Train that is the train worker
actor, whose training function runs in a thread while the actor's main thread (the only one Python
lets install handlers) serves Ray's calls, so ``DrainingTorchConfig`` installs it through the
backend's start hook, which runs on each actor's main thread (ray_drain.py). Ray's own SIGTERM handler there
would raise SystemExit mid-step; ours replaces it.

Who sends the signal: a pod's SIGTERM goes to its PID 1 (``ray start``), which does not forward it.
Each training process therefore registers its pid under ``TUNESERVE_DRAIN_DIR`` (default
``/tmp/tuneserve-drain``) and the Ray pods' preStop hook (builders/raycluster.py) signals those pids
and waits, within the grace period, until their files are gone (removed when training returns).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

log = logging.getLogger(__name__)
DRAIN_DIR_ENV = "TUNESERVE_DRAIN_DIR"
DEFAULT_DRAIN_DIR = "/tmp/tuneserve-drain"
DRAINED_EXIT_CODE = 3      # the driver's exit status after a drain (main.py)

_requested = threading.Event()
_training = threading.Event()      # between install() and training_ended()
_signal_name: Optional[str] = None
_previous = signal.SIG_DFL


def _on_signal(signum, frame) -> None:
    """While training: only note the request, the loop stops at the next step boundary. Before or
    after: what the process did before (Ray's handler exits the worker), so SIGTERM still stops an
    idle actor."""
    global _signal_name
    if not _training.is_set():
        return _pass_on(signum, frame)
    _signal_name = signal.Signals(signum).name
    _requested.set()


def _pass_on(signum, frame) -> None:
    if callable(_previous):
        _previous(signum, frame)
    elif _previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    return _signal_name or "drain requested"


def drain_dir() -> str:
    return os.environ.get(DRAIN_DIR_ENV, DEFAULT_DRAIN_DIR)


def _pid_file() -> str:
    return os.path.join(drain_dir(), str(os.getpid()))


def install() -> bool:
    """Install the SIGTERM handler (main thread only; False elsewhere) and register this pid."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("drain: not on the main thread; SIGTERM keeps its default action")
        return False
    global _previous
    previous = signal.signal(signal.SIGTERM, _on_signal)
    if previous is not _on_signal:
        _previous = previous
    _training.set()
    try:
        os.makedirs(drain_dir(), exist_ok=True)
        with open(_pid_file(), "w") as f:
            f.write("training\n")
    except OSError as e:
        log.warning("drain: could not register pid in %s: %s", drain_dir(), e)
    return True


def note_rank(rank: int) -> None:
    """Name the rank in this process's pid file (what an operator or a test reads to pick one)."""
    try:
        if os.path.exists(_pid_file()):
            with open(_pid_file(), "w") as f:
                f.write(f"rank {rank}\n")
    except OSError:
        pass


def training_ended() -> None:
    """Unregister: the preStop hook stops waiting for this process; SIGTERM acts as before."""
    _training.clear()
    try:
        os.remove(_pid_file())
    except OSError:
        pass


def reset() -> None:
    """Forget a request (a new training function in the same actor process)."""
    global _signal_name
    _requested.clear()
    _signal_name = None
