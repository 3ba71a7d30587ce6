"""FP8 frozen base for the fused LoRA layers (``TrainingSpec.base_precision == fp8``).

The frozen base weights are stored once in e4m3 with one fp32 scale per output row (about half
the bytes of bf16), and both of their GEMMs run in FP8 on the matrix units:

* forward  ``x @ W.T``: x quantized per row (token) on the fly, ``torch._scaled_mm`` with the
  row scales of x and the weight's per-output-row scales, bf16 out;
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


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


# On CUDA the forward's row quantization runs as Inductor kernels (a reduction and a cast pass)
# instead of ~6 eager passes over the activation, which would cost about as much as the FP8 GEMM
# it feeds: the custom op's forward is opaque to the caller's torch.compile, so it compiles its
# own. The backward (``fp8_input_grad``) is plain torch code that the caller's compile traces
# and fuses. A flag for the benchmark (bench/fp8_linear.py times both).
COMPILE_QUANTIZATION = True


def _quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fast = x.is_cuda and COMPILE_QUANTIZATION and not torch.compiler.is_compiling()
    return (_compiled(quantize_rows) if fast else quantize_rows)(x)


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
def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for a frozen W held as ``w8`` (out, in) e4m3 with (1, out) row scales."""
    x8, x_scale = _quantize_input(x)
    return _scaled_mm(x8, x_scale, w8.t(), w_scale, x.dtype)


@fp8_linear.register_fake
def _(x, w8, w_scale):
    return x.new_empty((x.shape[0], w8.shape[0]))


def _fp8_linear_setup(ctx, inputs, output):
    x, w8, w_scale = inputs
    ctx.save_for_backward(w8, w_scale)


def fp8_input_grad(grad: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``g @ W`` = ``(g * s_w) @ W8``: the weight's row scales fold into g, which is quantized per
    row; ``_scaled_mm`` takes W8 column-major, hence the transposed copy."""
    g8, g_scale = _quantize_scaled_rows(grad, w_scale)
    ones = torch.ones((1, w8.shape[1]), dtype=torch.float32, device=w8.device)
    return _scaled_mm(g8, g_scale, w8.t().contiguous().t(), ones, grad.dtype)


def _fp8_linear_backward(ctx, grad):
    w8, w_scale = ctx.saved_tensors
    return fp8_input_grad(grad, w8, w_scale), None, None


torch.library.register_autograd("tuneserve::fp8_linear", _fp8_linear_backward, setup_context=_fp8_linear_setup)


def release_bf16(weight: torch.Tensor) -> None:
    """Drop the storage of a base weight that now lives in FP8 (the fused layers read only the
    FP8 copy; the adapter saves without it and merging reloads the base from its files)."""
    weight.data = weight.data.new_empty((0,))
