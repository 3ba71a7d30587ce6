"""What this process's CPU does natively, for dtype choices that would otherwise differ silently
from node to node.

bf16 is native where the CPU has bf16 dot-product instructions: AVX512-BF16 (Cooper Lake, Zen 4
and later) or AMX-BF16 (Sapphire Rapids and later). There oneDNN runs bf16 matrix products at
about 2.5x fp32 (measured on an AVX512-BF16 EPYC: 386 vs 151 GFLOP/s for 2048^3); elsewhere
(AVX2 only) torch emulates bf16 through fp32 and it is slower than fp32.

``TUNESERVE_CPU_NATIVE_BF16=1|0`` overrides the detection: for nodes whose virtualisation hides or
misreports the flags, and for tests that must cover both paths on whatever CPU they run on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

NATIVE_BF16_ENV = "TUNESERVE_CPU_NATIVE_BF16"


@dataclass(frozen=True)
class CpuBf16:
    """Whether bf16 math is native here, and what says so ("AMX-BF16", "AVX512-BF16", "none",
    or the override variable)."""
    native: bool
    via: str


def detect_cpu_bf16() -> CpuBf16:
    """The override if set, else torch's own CPU probes (cpuinfo)."""
    override = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if override:
        if override not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16_ENV} must be 1 (native bf16) or 0 (none), got {override!r}")
        return CpuBf16(override == "1", f"{NATIVE_BF16_ENV}={override}")
    import torch
    probes = (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return CpuBf16(True, name)
    return CpuBf16(False, "none")
