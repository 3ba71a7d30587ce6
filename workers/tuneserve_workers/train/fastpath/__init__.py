"""Fast path for the LoRA training step: the two functions the training loop calls.

``optimize_for_training(model, device=..., compile=...)`` prepares a (PEFT-wrapped) causal LM for
fast training steps; ``causal_lm_loss(model, batch)`` computes ``(loss_sum, n_tokens)`` over the
labels that are not -100. Both work on any Hugging Face causal LM; the fast parts switch on only
where they are known to be exact up to bf16 rounding:

* Chunked linear cross-entropy (always, where the LM head is a plain frozen ``nn.Linear`` and the
  model applies no logit soft-capping or scaling): the ``[tokens, vocab]`` logits are never
  materialised whole; each chunk of tokens computes its logits, its loss and the gradient with
  respect to the hidden states in one go (the gradient is kept, so backward is one multiply).
  With a 128k vocabulary this removes several GiB of fp32 logits and their gradient.
* Fused LoRA decoder layers (Llama / Mistral / Qwen2-shaped models with PEFT LoRA on
  q,k,v,o,gate,up,down, on CUDA or when forced): the frozen q/k/v weights are concatenated into one
  matrix (and gate/up into another; the original parameters become views of it, so nothing is
  copied twice and adapters still save and merge as before), the LoRA A matrices of projections
  that share an input are applied as one matmul (x is read once for q,k,v and once for gate,up),
  the LoRA B matrices as one block-diagonal matmul, and the whole layer is one function of tensors
  that ``torch.compile`` fuses (RMSNorm, RoPE, SwiGLU, residual adds; the LoRA term is
  accumulated in the base GEMM, see _lora_group) and compiles once for all layers; SwiGLU's backward is a one-pass Triton kernel on CUDA (kernels.py).
  Attention is SDPA (cuDNN on H100) with ``is_causal`` for unpadded batches.
  Packed batches (``position_ids`` restart at each document) use variable-length flash attention
  over the documents on CUDA (``attention="auto"``; no ``[S, S]`` mask, causal blocks skipped),
  and an explicit document-causal mask elsewhere, for padded batches and inside CUDA graphs.

Everything here imports on a CPU-only box without Triton; on CPU ``optimize_for_training`` is a
no-op unless ``force=True`` (the unit tests force it to check the fused numerics in fp32).

The package, by concern: cross_entropy (chunked linear CE), lora_ops (the ``tuneserve::`` custom
ops), layer (planning, install and the fused layer function), attention (varlen, masks, SDPA
backend); this module holds the entry points.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import cross_entropy  # noqa: F401 - tests patch cross_entropy._CE_CHUNK_BYTES
from .attention import _attention_mask_for, _varlen_available  # noqa: F401 - _attention_mask_for: tests
from .cross_entropy import (IGNORE_INDEX, _CE_CHUNK_BYTES, _ce_chunk, _plain_frozen_lm_head,  # noqa: F401
                            linear_cross_entropy_sum, shift_labels)
from .layer import (_FastState, _causal_lm, _decoder, _fused_hidden, _install_fused,  # noqa: F401
                    _layer_meta, _make_layer_fn)

__all__ = ["optimize_for_training", "causal_lm_loss", "reset_fastpath", "packed_attention",
           "fastpath_summary", "IGNORE_INDEX"]

log = logging.getLogger(__name__)

_STATE_ATTR = "_tuneserve_fastpath"


def optimize_for_training(model: nn.Module, *, device: str, compile: bool, force: bool = False,
                          attention: str = "auto", fuse_layers: bool = True,
                          lora_add: str = "inplace", varlen: Optional[bool] = None,
                          swiglu_kernel: Optional[bool] = None,
                          base_precision: Optional[str] = None) -> nn.Module:
    """Prepare ``model`` for fast LoRA training steps (in place; returns it).

    Call it after the adapters are added and before the optimizer is built. On CPU it does
    nothing unless ``force``. Use ``compile=True`` on CUDA: the fused layers rely on
    torch.compile for their elementwise fusions. ``attention``: "auto" (SDPA picks; cuDNN on H100
    with torch 2.11), or force "flash" / "cudnn" / "efficient". ``fuse_layers=False`` keeps PEFT's
    layers (only compiles them) and ``lora_add`` ("inplace", "inplace-fwd", "addmm", "add"; see
    _lora_group) says where the LoRA term is added - both for comparisons in the benchmark. ``varlen``: packed
    batches attend per document through variable-length flash attention (None: on CUDA where
    torch has it and ``attention`` is auto or flash; True on CPU runs the per-document reference).
    ``swiglu_kernel``: the one-pass SwiGLU backward of kernels.py (None: on CUDA with Triton;
    True on CPU runs its torch reference). ``base_precision="fp8"``: the frozen base weights of
    the fused layers in FP8 with FP8 GEMMs (fp8.py); it needs the fused layers and says why not.
    """
    if base_precision not in (None, "fp8"):
        raise ValueError(f"base_precision must be None or fp8, not {base_precision!r}")
    if lora_add not in ("inplace", "inplace-fwd", "addmm", "add"):
        raise ValueError(f"lora_add must be inplace, inplace-fwd, addmm or add, not {lora_add!r}")
    dev = torch.device(device).type if device else "cpu"
    if dev == "cpu" and not force:
        return model
    if getattr(model, _STATE_ATTR, None) is not None:
        return model
    # The fused layers bypass the decoder layers' own forward, so they honour the model's
    # gradient checkpointing themselves: the memory sizing of the job assumes it when it is on.
    st = _FastState(device=dev, compiled=bool(compile), attention=attention, lora_add=lora_add,
                    recompute=bool(getattr(_causal_lm(model), "is_gradient_checkpointing", False)),
                    base_precision=base_precision)
    if fuse_layers:
        _install_fused(model, st)
        st.varlen = (bool(varlen) if varlen is not None else
                     dev == "cuda" and attention in ("auto", "flash")
                     and _varlen_available(st.attn_scale, st.head_dim))
        st.swiglu_kernel = (bool(swiglu_kernel) if swiglu_kernel is not None else
                            dev == "cuda" and kernels.triton is not None)
    else:
        st.reason = "fuse_layers=False"
    if base_precision == "fp8" and not st.fused:
        raise ValueError(f"an FP8 base needs the fused LoRA layers, which are off: {st.reason}")
    if compile:
        _compile_unfused(model, st)
    if st.fused:
        st.layer_fns = _layer_fns(st, compile)
    setattr(model, _STATE_ATTR, st)
    return model



def _compile_unfused(model: nn.Module, st: _FastState) -> None:
    """torch.compile what the fused layers do not cover: the CE chunk, PEFT's layers if unfused."""
    import torch._dynamo as dynamo
    # One graph serves every layer (same shapes); leave headroom for the few variants
    # (first layer's input needs no grad, train/eval).
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, key):
            setattr(dynamo.config, key, max(getattr(dynamo.config, key), 64))
    if not st.fused:
        for layer in _decoder(_causal_lm(model)).layers:
            layer.compile(dynamic=False)
    st.ce_chunk_fn = torch.compile(_ce_chunk, dynamic=False)


def _layer_fns(st: _FastState, compile: bool) -> list:
    """One layer function per fused layer; layers with equal _layer_meta share one (compiled)."""
    fns: dict = {}
    out = []
    for p in st.layers:
        meta = _layer_meta(p)
        if meta not in fns:
            fn = _make_layer_fn(st, meta)
            fns[meta] = torch.compile(fn, dynamic=False) if compile else fn
        out.append(fns[meta])
    return out

def reset_fastpath(model: nn.Module) -> None:
    """Forget what optimize_for_training set up (compiled graphs too); weights stay as they are.

    For benchmarks that compare configurations on one model; training code never needs it.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        delattr(model, _STATE_ATTR)
    for layer in _decoder(_causal_lm(model)).layers:
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None
    import torch._dynamo
    torch._dynamo.reset()


def packed_attention(model: nn.Module) -> Optional[str]:
    """How the fused layers attend within packed rows: "varlen", "mask", or None (not fused)."""
    st = getattr(model, _STATE_ATTR, None)
    if st is None or not st.fused:
        return None
    return "varlen" if st.varlen else "mask"


def fastpath_summary(model: nn.Module) -> str:
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        return "fastpath: not optimized (plain model, chunked CE where possible)"
    parts = [f"device={st.device}", f"compile={st.compiled}",
             f"fused_layers={'yes' if st.fused else 'no (' + st.reason + ')'}", f"attention={st.attention}",
             f"packed={'varlen' if st.varlen else 'mask'}", f"lora_add={st.lora_add}",
             f"swiglu={'kernel' if st.swiglu_kernel else 'compiled'}", f"recompute={st.recompute}",
             f"base={st.base_precision or 'as loaded'}"]
    return "fastpath: " + ", ".join(parts)



def causal_lm_loss(model: nn.Module, batch: dict, *, masked: Optional[bool] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies over labels != -100, number of such tokens).

    ``batch``: input_ids, labels [B, S]; optional attention_mask, position_ids (packed sequences:
    positions restart at 0 at each document). Labels are shifted as transformers does (position t
    predicts labels[t+1]). Divide the sum by the (global) token count for the mean loss.
    ``masked``: decide the fused layers' attention mask without reading the batch (for CUDA
    graphs; see _attention_mask_for); None looks at the values.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention_mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    target = shift_labels(labels)
    n_tokens = (target != IGNORE_INDEX).sum()
    st = getattr(model, _STATE_ATTR, None)
    causal = _causal_lm(model)
    if st is not None and st.fused:
        hidden = _fused_hidden(model, st, input_ids, attention_mask, position_ids, masked)
    else:
        out = _decoder(causal)(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    w = _plain_frozen_lm_head(causal)
    if w is not None:
        chunk_fn = st.ce_chunk_fn if st is not None and st.ce_chunk_fn is not None else None
        loss_sum = linear_cross_entropy_sum(hidden, w, target, chunk_fn=chunk_fn)
    else:
        logits = causal.get_output_embeddings()(hidden)
        cfg = causal.config
        if getattr(cfg, "final_logit_softcapping", None):
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            logits = logits * cfg.logit_scale
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, n_tokens
