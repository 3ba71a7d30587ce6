"""FP8 frozen base for the fused LoRA layers (``TrainingSpec.base_precision == fp8``).

The frozen base weights are stored once in e4m3 with one fp32 scale per output row (about half
the bytes of bf16), and both of their GEMMs run in FP8 on the matrix units:

* forward  ``x @ W.T``: x quantized per row (token) on the fly, in traced code that the
  layer's torch.compile fuses into the kernel producing x (RMSNorm, SwiGLU, attention output),
  then ``torch._scaled_mm`` with the row scales of x and the weight's per-output-row scales,
  bf16 out;
* backward ``g @ W`` (the input gradient; a frozen weight has no weight gradient): the weight's
  per-row scales fold into g first (``(g * s_w) @ W8``), which is then quantized per row, so the
  same e4m3 weight serves both directions; ``_scaled_mm`` wants its second operand column-major,
  so W8 is transposed per call (one pass over 1 byte per weight, transient).

LoRA, norms, attention, the embedding and the output head stay in the training precision. On
CPU ``_scaled_mm`` is not used: the same quantized operands are dequantized and multiplied in
fp32 (an emulation with FP8's rounding of inputs, fp32 accumulation as on the GPU), so CI
exercises the quantization, the scales and the autograd wiring without a GPU.
"""
from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)   # 448
_TINY = 1e-12


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t8, scale)`` with ``t ~= t8 * scale``: e4m3 values, one fp32 scale per row, shape (rows, 1)."""
    tf = t.float()
    scale = tf.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / E4M3_MAX
    return (tf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _quantize_scaled_rows(t: torch.Tensor, col_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(t * col_scale)``: the input gradient with the weight's row scales folded in."""
    return quantize_rows(t.float() * col_scale)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen (out, in) weight as e4m3 plus its per-output-row scales as a (1, out) fp32 row,
    the layout ``_scaled_mm`` takes for its second operand's scales."""
    w8, scale = quantize_rows(w.detach())
    return w8.contiguous(), scale.reshape(1, -1).contiguous()


def _scaled_mm(a8: torch.Tensor, a_scale: torch.Tensor, b8_t: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``(a8 * a_scale) @ (b8_t * b_scale)``: FP8 matrix units on CUDA; fp32 emulation elsewhere."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8_t, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    return ((a8.float() * a_scale) @ (b8_t.float() * b_scale)).to(out_dtype)


@torch.library.custom_op("tuneserve::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
               w_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for a frozen W held as ``w8`` (out, in) e4m3 with (1, out) row scales, from
    ``(x8, x_scale) = quantize_rows(x)``. The caller quantizes (``fp8_matmul``) so that its
    torch.compile fuses the quantization into whatever produced x; ``x`` itself is only the
    input the gradient is routed to (autograd below), the GEMM reads ``x8``."""
    return _scaled_mm(x8, x_scale, w8.t(), w_scale, x.dtype)


@fp8_linear.register_fake
def _(x, x8, x_scale, w8, w_scale):
    return x.new_empty((x.shape[0], w8.shape[0]))


def fp8_matmul(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` through the FP8 GEMM: x quantized per row here (traced and fused when compiled)."""
    x8, x_scale = quantize_rows(x)
    return torch.ops.tuneserve.fp8_linear(x, x8, x_scale, w8, w_scale)


def _fp8_linear_setup(ctx, inputs, output):
    x, x8, x_scale, w8, w_scale = inputs
    ctx.save_for_backward(w8, w_scale)


@torch.library.custom_op("tuneserve::fp8_dgrad", mutates_args=())
def fp8_dgrad(g8: torch.Tensor, g_scale: torch.Tensor, w8: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(g8 * g_scale) @ W8``. ``_scaled_mm`` takes W8 column-major, hence a transposed copy,
    made here, inside an op the compiler cannot see into: traced, the partitioner moved the
    copies into the forward pass and kept every layer's until its backward (+1 byte per weight
    at the peak, all the memory the FP8 base saves)."""
    ones = torch.ones((1, w8.shape[1]), dtype=torch.float32, device=w8.device)
    return _scaled_mm(g8, g_scale, _transposed(w8).t(), ones, out_dtype)


@fp8_dgrad.register_fake
def _(g8, g_scale, w8, out_dtype):
    return g8.new_empty((g8.shape[0], w8.shape[1]), dtype=out_dtype)


def _transpose_copy(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


@functools.lru_cache(maxsize=None)
def _compiled_transpose():
    return torch.compile(_transpose_copy, dynamic=False)


def _transposed(w8: torch.Tensor) -> torch.Tensor:
    """W8 laid out transposed. Eager, PyTorch's copy moves 1-byte elements across a transpose at
    a fraction of the memory bandwidth: the FP8 step fell from 20.8k to 17.3k tokens/s on an H200
    when these copies moved from Inductor's kernels to eager ones, so on CUDA the copy is a
    compiled (tiled) kernel again (not yet timed on a GPU in this form)."""
    if w8.is_cuda and not torch.compiler.is_compiling():
        return _compiled_transpose()(w8)
    return _transpose_copy(w8)


def fp8_input_grad(grad: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``g @ W`` = ``(g * s_w) @ W8``: the weight's row scales fold into g, which is quantized per
    row in traced code (fused by the compiled backward), then the FP8 GEMM."""
    g8, g_scale = _quantize_scaled_rows(grad, w_scale)
    return torch.ops.tuneserve.fp8_dgrad(g8, g_scale, w8, grad.dtype)


def _fp8_linear_backward(ctx, grad):
    w8, w_scale = ctx.saved_tensors
    return fp8_input_grad(grad, w8, w_scale), None, None, None, None


torch.library.register_autograd("tuneserve::fp8_linear", _fp8_linear_backward, setup_context=_fp8_linear_setup)


def release_bf16(weight: torch.Tensor) -> None:
    """Drop the storage of a base weight that now lives in FP8 (the fused layers read only the
    FP8 copy; the adapter saves without it and merging reloads the base from its files)."""
    weight.data = weight.data.new_empty((0,))
