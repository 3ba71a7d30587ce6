#!/usr/bin/env python3
"""The FP8 base GEMMs of fastpath/fp8.py at the Llama-3-8B step's shapes (M = 4096 tokens), on
one CUDA GPU: correctness against float64 (fresh random inputs) and time per call (median of
``triton.testing.do_bench``), next to the bf16 GEMM the worker runs without FP8.

  forward   bf16 ``x @ W.T``  vs  ``fp8_linear`` (row quantization of x + ``_scaled_mm``)
            and ``_scaled_mm`` alone on pre-quantized x (the quantization's share)
  backward  bf16 ``g @ W``    vs  fp8 (g scaled, quantized per row, W8 transposed, ``_scaled_mm``)

  python3 bench/fp8_linear.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))
from tuneserve_workers.train.fastpath import fp8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate+up": (28672, 4096), "down": (4096, 14336)}
M = 4096


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    from triton.testing import do_bench
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, M={M}")
    print(f"{'GEMM':<9} {'N x K':>12} {'bf16 fwd':>9} {'fp8 fwd':>8} {'mm only':>8} {'bf16 bwd':>9} {'fp8 bwd':>8} "
          f"{'fwd x':>6} {'bwd x':>6} {'TF/s fp8 mm':>11} {'err fwd':>8} {'err bwd':>8}")
    total = {"bf16": 0.0, "fp8": 0.0, "fp8-eager-quant": 0.0}
    for name, (n, k) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(n + k)
        x = torch.randn(M, k, device=dev, dtype=torch.bfloat16, generator=g)
        w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).to(torch.bfloat16)
        gy = torch.randn(M, n, device=dev, dtype=torch.bfloat16, generator=g)
        w8, ws = fp8.quantize_weight(w)
        x8, xs = fp8.quantize_rows(x)
        fwd = torch.compile(fp8.fp8_matmul, dynamic=False)   # quantization fused, as in the compiled layer
        out = fwd(x, w8, ws)
        err_f = rel(out, x.double() @ w.double().t())
        xg = x.clone().requires_grad_()
        fp8.fp8_matmul(xg, w8, ws).backward(gy)
        err_b = rel(xg.grad, gy.double() @ w.double())
        t_bf = do_bench(lambda: x @ w.t(), return_mode="median")
        t_f8 = do_bench(lambda: fwd(x, w8, ws), return_mode="median")
        t_mm = do_bench(lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16),
                        return_mode="median")
        t_bf_b = do_bench(lambda: gy @ w, return_mode="median")
        bwd = torch.compile(fp8.fp8_input_grad, dynamic=False)   # as the compiled layer's backward runs it
        t_f8_b = do_bench(lambda: bwd(gy, w8, ws), return_mode="median")
        t_eq = do_bench(lambda: fp8.fp8_matmul(x, w8, ws), return_mode="median")
        t_eq_b = do_bench(lambda: fp8.fp8_input_grad(gy, w8, ws), return_mode="median")
        total["bf16"] += t_bf + t_bf_b
        total["fp8"] += t_f8 + t_f8_b
        total["fp8-eager-quant"] += t_eq + t_eq_b
        tf = 2 * M * n * k / (t_mm * 1e-3) / 1e12
        print(f"{name:<9} {n:>6}x{k:<5} {t_bf:>9.3f} {t_f8:>8.3f} {t_mm:>8.3f} {t_bf_b:>9.3f} {t_f8_b:>8.3f} "
              f"{t_bf / t_f8:>6.2f} {t_bf_b / t_f8_b:>6.2f} {tf:>11.0f} {err_f:>8.4f} {err_b:>8.4f}")
    print(f"one layer's base GEMMs, forward + input gradient: bf16 {total['bf16']:.3f} ms, fp8 {total['fp8']:.3f} ms "
          f"({total['bf16'] / total['fp8']:.2f}x), fp8 with eager quantization {total['fp8-eager-quant']:.3f} ms "
          f"({total['bf16'] / total['fp8-eager-quant']:.2f}x); times in ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
