"""The training worker's precision choice (pure, table-driven) and the CPU detection it relies on,
checked against /proc/cpuinfo rather than the torch probes it uses."""
from __future__ import annotations

import pytest

from worker_helpers import expected_cpu_bf16
from tuneserve_workers.contract import Precision
from tuneserve_workers.cpu import NATIVE_BF16_ENV, CpuBf16, detect_cpu_bf16
from tuneserve_workers.train.model import choose_precision

pytestmark = pytest.mark.worker
AMX, AVX512, NONE = CpuBf16(True, "AMX-BF16"), CpuBf16(True, "AVX512-BF16"), CpuBf16(False, "none")

CASES = [
    # requested, device, cpu, trains in, note starts with
    (Precision.bf16, "cuda", None, Precision.bf16, None),
    (Precision.fp16, "npu", None, Precision.fp16, None),
    (Precision.fp32, "cuda", None, Precision.fp32, None),
    (Precision.bf16, "cpu", AMX, Precision.bf16, "training in bf16 on CPU (native bf16: AMX-BF16;"),
    (Precision.bf16, "cpu", AVX512, Precision.bf16, "training in bf16 on CPU (native bf16: AVX512-BF16;"),
    (Precision.bf16, "cpu", NONE, Precision.fp32, "bf16 requested; training in fp32 on CPU (this CPU has no native bf16"),
    (Precision.bf16, "cpu", None, Precision.fp32, "bf16 requested; training in fp32 on CPU (this CPU has no native bf16"),
    (Precision.fp16, "cpu", AMX, Precision.fp32, "fp16 requested; training in fp32 on CPU (CPUs have no fp16 training path)"),
    (Precision.fp32, "cpu", AMX, Precision.fp32, "training in fp32 on CPU, as requested"),
    (Precision.fp32, "cpu", NONE, Precision.fp32, "training in fp32 on CPU, as requested"),
]


@pytest.mark.parametrize("requested,device,cpu,want,note", CASES,
                         ids=[f"{c[0].value}-{c[1]}-{c[2].via if c[2] else 'unknown'}" for c in CASES])
def test_choose_precision(requested, device, cpu, want, note):
    choice = choose_precision(requested, device, cpu)
    assert choice.precision is want
    if note is None:
        assert choice.note is None
    else:
        assert choice.note.startswith(note), choice.note


def test_detection_matches_the_kernel_cpu_flags(monkeypatch):
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)
    native, via = expected_cpu_bf16()
    assert detect_cpu_bf16() == CpuBf16(native, via)


@pytest.mark.parametrize("value,native", [("1", True), ("0", False)])
def test_the_override_pins_the_detection(monkeypatch, value, native):
    monkeypatch.setenv(NATIVE_BF16_ENV, value)
    assert detect_cpu_bf16() == CpuBf16(native, f"{NATIVE_BF16_ENV}={value}")


def test_a_malformed_override_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=f"{NATIVE_BF16_ENV} must be 1 .* got 'yes'"):
        detect_cpu_bf16()
