"""Attention of the fused layers: variable-length flash attention over packed documents, the
document-causal mask (and its cu_seqlens form), and the SDPA backend context.

Packed batches (``position_ids`` restart at each document) use variable-length flash attention
over the documents on CUDA (no ``[S, S]`` mask, causal blocks skipped), and an explicit
document-causal mask elsewhere, for padded batches and inside CUDA graphs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F


def _load_varlen():
    """torch's variable-length flash attention as f(q, k, v, cu, max_len, scale), or None.

    Its keywords moved between releases (2.10: ``is_causal``; later: ``window_size=(-1, 0)``,
    ``enable_gqa``), so the call is built from the signature once.
    """
    try:
        import inspect
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    kw: dict = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        return None
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    has_scale = "scale" in params

    def call(q, k, v, cu, max_len: int, scale: float):
        extra = {"scale": scale} if has_scale else {}
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw, **extra)

    call.has_scale = has_scale
    return call


_VARLEN = _load_varlen()


def _varlen_available(scale: float, head_dim: int) -> bool:
    if _VARLEN is None or not torch.cuda.is_available():
        return False
    return _VARLEN.has_scale or abs(scale - head_dim ** -0.5) < 1e-12


def _varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_len: int, scale: float) -> torch.Tensor:
    """Causal attention inside each document of a flattened packed batch.

    q [T, Hq, D], k/v [T, Hkv, D]; ``cu`` int32 [n_docs + 1] document offsets into T. CUDA runs
    torch's flash varlen kernel; elsewhere (CPU unit tests) one SDPA call per document - the
    ground truth the kernel is held to.
    """
    if q.is_cuda and _VARLEN is not None:
        return _VARLEN(q, k, v, cu, max_len, scale)
    rep = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
            ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
            parts.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
                         .transpose(0, 1))
    return torch.cat(parts, 0)



def _attention_mask_for(batch_attn: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                        bsz: int, seq: int, device, masked: Optional[bool] = None,
                        varlen: bool = False) -> Optional[torch.Tensor]:
    """None for plain causal batches; else a bool [B,1,S,S] document-causal mask - or, with
    ``varlen`` for a packed batch without padding, the int32 document offsets (cu_seqlens) into
    the flattened batch that _varlen_causal takes.

    Documents start where position_ids is 0 (packing, as transformers reads it); padding
    (attention_mask 0) is masked as a key. Every query may see itself, so no row is empty.
    ``masked`` given: build the mask (or not) without looking at the values - no host sync, as a
    CUDA graph needs; the mask of a batch that needs none is plain causal, so either is exact.
    """
    if masked is None:
        packed = position_ids is not None and bool(((position_ids[:, 1:] - position_ids[:, :-1]) != 1).any())
        padded = batch_attn is not None and not bool(batch_attn.bool().all())
    else:
        packed = masked and position_ids is not None
        padded = masked and batch_attn is not None
    if not packed and not padded:
        return None
    if varlen and packed and not padded and masked is None:
        starts = position_ids == 0
        starts[:, 0] = True                 # a row always starts a document
        cu = torch.nonzero(starts.reshape(-1)).reshape(-1).to(torch.int32)
        cu = torch.cat([cu, cu.new_full((1,), bsz * seq)])
        from torch._dynamo import mark_dynamic
        mark_dynamic(cu, 0)                 # one compiled layer for any number of documents
        return cu
    idx = torch.arange(seq, device=device)
    allowed = (idx[None, :] <= idx[:, None]).unsqueeze(0)                      # [1,S,S]
    if packed:
        doc = torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    if padded:
        allowed = allowed & batch_attn.bool()[:, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device).unsqueeze(0)
    return allowed.expand(bsz, seq, seq).unsqueeze(1)



def _sdpa_context(st) -> contextlib.AbstractContextManager:
    """The SDPA backend ``st.attention`` forces (with the math fallback off CUDA), else none."""
    if st.attention in ("flash", "cudnn", "efficient"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                             "efficient": SDPBackend.EFFICIENT_ATTENTION}[st.attention],
                            SDPBackend.MATH][:1 if st.device == "cuda" else 2])
    return contextlib.nullcontext()

