"""The torch.library custom ops of the fused LoRA layers: ``tuneserve::base_plus_lora`` and
``tuneserve::lora_linear``, with their fake (meta) kernels and autograd.

Both add the LoRA term first and let the frozen base GEMM accumulate onto it in place, which
neither ``torch.addmm`` nor Inductor does. Importing this module registers the ops; callers use
them as ``torch.ops.tuneserve.*``.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("tuneserve::base_plus_lora", mutates_args=())
def base_plus_lora(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + xa @ bt`` for a frozen ``w``: the LoRA term first, then the base GEMM
    accumulates onto it in place (beta=1). ``torch.addmm(lora, x, w.T)`` computes the same sum
    bit for bit but first copies the addend into a new output (a full-size copy per projection);
    Inductor does not re-inplace addmm, hence an op of our own."""
    out = torch.mm(xa, bt)
    return out.addmm_(x, w.t())


@base_plus_lora.register_fake
def _(x, w, xa, bt):
    return x.new_empty((x.shape[0], w.shape[0]))


def _base_plus_lora_setup(ctx, inputs, output):
    x, w, xa, bt = inputs
    ctx.save_for_backward(w, xa, bt)


def _base_plus_lora_backward(ctx, grad):
    w, xa, bt = ctx.saved_tensors
    # w is frozen (checked by the caller): no weight gradient, and x itself need not be saved.
    return grad @ w, None, grad @ bt.t(), xa.t() @ grad


torch.library.register_autograd("tuneserve::base_plus_lora", _base_plus_lora_backward,
                                setup_context=_base_plus_lora_setup)


@torch.library.custom_op("tuneserve::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ w.T + s * (x @ a.T) @ bt, s * x @ a.T)`` for a frozen ``w``, no dropout.

    Like base_plus_lora, and its backward does the same for the input gradient: the LoRA part
    ``dxa @ a`` is computed first and the frozen weight's ``g @ w`` accumulates onto it in the
    GEMM (whose epilogue read hides under the compute), instead of autograd adding the two in a
    memory-bound kernel. The second output (the scaled LoRA-A activation, rank-wide) is what
    backward needs for the B gradient."""
    xa = torch.mm(x, a.t()) * scale
    out = torch.mm(xa, bt)
    return out.addmm_(x, w.t()), xa


@lora_linear.register_fake
def _(x, w, a, bt, scale):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], a.shape[0]))


def _lora_linear_setup(ctx, inputs, output):
    x, w, a, bt, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, w, a, bt, output[1])


def _lora_linear_backward(ctx, grad, grad_xa):
    x, w, a, bt, xa = ctx.saved_tensors
    dxa = grad @ bt.t()
    if grad_xa is not None:
        dxa = dxa + grad_xa
    dxa = dxa * ctx.scale
    dx = torch.ops.tuneserve.base_plus_lora(grad, w.t(), dxa, a)     # grad @ w + dxa @ a
    return dx, None, dxa.t() @ x, xa.t() @ grad, None


torch.library.register_autograd("tuneserve::lora_linear", _lora_linear_backward,
                                setup_context=_lora_linear_setup)
