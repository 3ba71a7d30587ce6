"""Hand-written kernels the fused layers use where torch.compile's own are measurably slower.

SwiGLU backward: the fused layers keep gate and up as the two halves of one ``[T, 2I]`` GEMM
output, and the backward must produce the gradient in that same layout. Inductor writes it as one
pointwise kernel over the concatenated output, which loads g, u and the incoming gradient once for
each half - 1.6x the bytes needed (an H100 spent ~326 us per Llama-3-8B layer at batch 2 x 2048;
bench/README.md). The Triton kernel here reads each input once and writes both halves.

Imports on a CPU-only box without Triton: ``swiglu`` then runs the same math in torch, which is
also the reference the unit tests hold the autograd function to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def swiglu_backward_reference(gu: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d(silu(g) * u) / d[g, u] for gu = [g | u], in torch (at least fp32 math, result in gu's dtype)."""
    math = torch.promote_types(gu.dtype, torch.float32)
    g, u = gu.to(math).chunk(2, dim=-1)
    d = dy.to(math)
    sig = torch.sigmoid(g)
    dg = d * u * sig * (1 + g * (1 - sig))
    du = d * g * sig
    return torch.cat([dg, du], dim=-1).to(gu.dtype)


if triton is not None:
    @triton.jit
    def _swiglu_bwd_kernel(gu_ptr, dy_ptr, dgu_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < inter
        base = row * 2 * inter
        g = tl.load(gu_ptr + base + cols, mask=keep).to(tl.float32)
        u = tl.load(gu_ptr + base + inter + cols, mask=keep).to(tl.float32)
        d = tl.load(dy_ptr + row * inter + cols, mask=keep).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = d * u * sig * (1 + g * (1 - sig))
        du = d * g * sig
        tl.store(dgu_ptr + base + cols, dg.to(dgu_ptr.dtype.element_ty), mask=keep)
        tl.store(dgu_ptr + base + inter + cols, du.to(dgu_ptr.dtype.element_ty), mask=keep)

    @triton_op("tuneserve::swiglu_backward", mutates_args={})
    def swiglu_backward_cuda(gu: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        gu, dy = gu.contiguous(), dy.contiguous()
        inter = dy.shape[-1]
        rows = dy.numel() // inter
        dgu = torch.empty_like(gu)
        block = 1024
        wrap_triton(_swiglu_bwd_kernel)[(rows, triton.cdiv(inter, block))](gu, dy, dgu, inter, BLOCK=block)
        return dgu


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        g, u = gu.chunk(2, dim=-1)
        ctx.save_for_backward(gu)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        if gu.is_cuda and triton is not None:
            return swiglu_backward_cuda(gu, dy)
        return swiglu_backward_reference(gu, dy)


def swiglu(gu: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """silu(g) * u for gu = [g | u] on the last dim; ``kernel`` uses the one-pass backward."""
    if kernel:
        return _SwiGLU.apply(gu)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u
