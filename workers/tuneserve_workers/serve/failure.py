"""Why a vLLM engine failed, in one line for the replica's report (and so the ModelServe status).

What the replica itself gets is rarely the cause: ``EngineDeadError: EngineCore encountered an
issue. See stack trace (above) for the root cause.`` or ``Engine core initialization failed. See
root cause above.`` The cause is in the engine processes' output (``engine_output.py`` keeps its
tail): a fatal signal reported by Python's faulthandler (the replica turns it on for them), vLLM's
"Worker proc ... died unexpectedly", or the exception a worker raised. Pure: text in, text out.
"""
from __future__ import annotations

import re
from typing import Optional

# "(EngineCore pid=12) ERROR 12-01 21:22:43 [core.py:1510] " in front of vLLM's log lines.
_LOG_PREFIX = re.compile(r"^\([^()]* pid=\d+\)\s+(?:[A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ?)?")
_FATAL = re.compile(r"^Fatal Python error: (.+?)\s*$")
_FRAME = re.compile(r'^\s+File "(?P<path>[^"]+)", line (?P<line>\d+),? in (?P<func>\S+)')
_DIED = re.compile(r"Worker proc (?P<name>\S+) died unexpectedly|WorkerProc initialization failed")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<type>[A-Z]\w*(?:Error|Exception|Exit))(?::\s*(?P<msg>.*))?$")
# Messages that only point elsewhere ("see above"): never the cause themselves.
_WRAPPERS = ("see root cause above", "see stack trace", "stack trace above", "failed due to an exception in a background process",
             "executor failed", "engine core initialization failed", "encountered an issue")
SIGNALS = {"Illegal instruction": "SIGILL", "Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT",
           "Bus error": "SIGBUS", "Floating point exception": "SIGFPE"}
MAX_CAUSE = 600


def _lines(output: str) -> list[str]:
    return [_LOG_PREFIX.sub("", line.rstrip()) for line in output.splitlines()]


def _short_path(path: str) -> str:
    return path.split("site-packages/", 1)[-1]


def fatal_signal(lines: list[str]) -> Optional[str]:
    """The last faulthandler report: 'Fatal Python error: Illegal instruction (SIGILL) at
    vllm/x.py:46 in f' (the innermost frame of the thread that crashed)."""
    found = [(i, m[1]) for i, m in enumerate(map(_FATAL.match, lines)) if m]
    if not found:
        return None
    at, name = found[-1]
    text = f"Fatal Python error: {name}" + (f" ({SIGNALS[name]})" if name in SIGNALS else "")
    current = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("Current thread")), None)
    frame = None
    for line in lines[current + 1:] if current is not None else ():
        if not line.strip() or (frame := _FRAME.match(line)):   # skips e.g. "  Garbage-collecting"
            break
    if frame:
        text += f" at {_short_path(frame['path'])}:{frame['line']} in {frame['func']}"
    return text


def _points_elsewhere(text: str) -> bool:
    return any(w in text.lower() for w in _WRAPPERS)


def root_exception(lines: list[str]) -> Optional[str]:
    """The last exception line that is a cause rather than a pointer to one."""
    for line in reversed(lines):
        m = _EXCEPTION.match(line.strip())
        if m and not _points_elsewhere(line):
            return f"{m['type']}: {m['msg']}" if m["msg"] else m["type"]
    return None


def failure_cause(output: str, error: Optional[BaseException] = None) -> str:
    """One line naming why the engine failed, most specific evidence first: a fatal signal, the
    error itself unless it only says "see above", the last exception the engine processes
    printed, a worker that vanished without a word."""
    lines = _lines(output)
    died = next((m["name"] or "a vLLM worker" for m in map(_DIED.search, reversed(lines)) if m), None)
    fatal = fatal_signal(lines)
    own = f"{type(error).__name__}: {error}".rstrip(": ") if error is not None else None
    if fatal:
        cause = f"{died} died: {fatal}" if died else fatal
    elif own and not _points_elsewhere(own):
        cause = own
    elif found := root_exception(lines):
        cause = found
    elif died:
        cause = (f"{died} died unexpectedly without a fatal-error report: it was killed "
                 "(SIGKILL; the out-of-memory killer is the usual cause)")
    else:
        cause = own or "unknown cause"
    return cause if len(cause) <= MAX_CAUSE else cause[:MAX_CAUSE - 3] + "..."
