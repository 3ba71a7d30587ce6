"""Chunked linear cross-entropy: the LM loss without ``[tokens, vocab]`` logits.

Where the LM head is a plain frozen ``nn.Linear`` and the model applies no logit soft-capping or
scaling (``_plain_frozen_lm_head``), each chunk of tokens computes its logits, its loss and the
gradient with respect to the hidden states in one go (the gradient is kept, so backward is one
multiply). With a 128k vocabulary this removes several GiB of fp32 logits and their gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...contract import CE_CHUNK_LOGIT_BYTES, ce_chunk_tokens

IGNORE_INDEX = -100
# Logit bytes per chunk of the chunked cross-entropy (bf16 logits); 2048 tokens at a 128k vocab.
_CE_CHUNK_BYTES = CE_CHUNK_LOGIT_BYTES


def _plain_frozen_lm_head(causal: nn.Module) -> Optional[torch.Tensor]:
    """The LM head weight when a chunked linear CE reproduces the model's logits exactly."""
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    cfg = getattr(causal, "config", None)
    for attr in ("final_logit_softcapping", "logit_softcapping"):
        if getattr(cfg, attr, None):
            return None
    if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head.weight



def _ce_chunk(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, need_grad: bool):
    """Loss sum over one chunk of tokens and (optionally) d loss_sum / d h. fp32 softmax."""
    logits = (h @ w.t()).float()                     # same rounding as lm_head(h).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = target != IGNORE_INDEX
    tgt = torch.where(valid, target, torch.zeros_like(target))
    picked = logits.gather(1, tgt.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    if not need_grad:
        return loss, None
    vocab = torch.arange(logits.shape[1], device=logits.device)
    grad_logits = torch.exp(logits - lse.unsqueeze(1)) - (vocab.unsqueeze(0) == tgt.unsqueeze(1)).float()
    grad_logits = torch.where(valid.unsqueeze(1), grad_logits, torch.zeros_like(grad_logits))
    return loss, grad_logits.to(h.dtype) @ w


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) without keeping [N, vocab] logits; W must be frozen."""

    @staticmethod
    def forward(ctx, h, w, target, chunk, chunk_fn):  # noqa: D401 - autograd API
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            loss, g = chunk_fn(h[s:s + chunk], w, target[s:s + chunk], need_grad)
            total = total + loss
            if need_grad:
                grad_h[s:s + chunk] = g
        ctx.save_for_backward(grad_h if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


def linear_cross_entropy_sum(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                             chunk: Optional[int] = None, chunk_fn=None) -> torch.Tensor:
    """Sum of token cross-entropies of ``h @ w.T`` against ``target`` (-100 ignored), fp32."""
    h = h.reshape(-1, h.shape[-1])
    target = target.reshape(-1)
    if chunk is None:
        chunk = ce_chunk_tokens(w.shape[0], _CE_CHUNK_BYTES)
    return _LinearCrossEntropy.apply(h, w, target, int(chunk), chunk_fn or _ce_chunk)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, 1:] padded with -100: what transformers' ForCausalLMLoss predicts at each position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
