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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import swiglu

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_STATE_ATTR = "_tuneserve_fastpath"
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Logit bytes per chunk of the chunked cross-entropy (bf16 logits); 2048 tokens at a 128k vocab.
_CE_CHUNK_BYTES = 512 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# helpers: find the pieces of a (PEFT-wrapped) HF causal LM
# ----------------------------------------------------------------------------------------------
def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PeftModel (or the model itself)."""
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def _decoder(causal: nn.Module) -> nn.Module:
    if hasattr(causal, "get_decoder"):
        try:
            dec = causal.get_decoder()
            if dec is not None:
                return dec
        except Exception:  # pragma: no cover - odd models
            pass
    return causal.model


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


# ----------------------------------------------------------------------------------------------
# chunked linear cross-entropy
# ----------------------------------------------------------------------------------------------
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
        chunk = _CE_CHUNK_BYTES // (2 * w.shape[0])
        # whole GEMM tiles: 2048 rather than 2093 tokens at a 128k vocabulary
        chunk = chunk // 256 * 256 if chunk >= 256 else max(16, chunk)
    return _LinearCrossEntropy.apply(h, w, target, int(chunk), chunk_fn or _ce_chunk)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, 1:] padded with -100: what transformers' ForCausalLMLoss predicts at each position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# fused LoRA decoder layer
# ----------------------------------------------------------------------------------------------
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


@dataclass
class _Lora:
    A: nn.Parameter           # (r, in)
    B: nn.Parameter           # (out, r)
    scale: float
    dropout: float


@dataclass
class _LayerParams:
    ln1: torch.Tensor
    ln2: torch.Tensor
    w_qkv: torch.Tensor       # (q+k+v out, hidden), the q/k/v base weights are views of it
    b_qkv: Optional[torch.Tensor]
    qkv: list                 # [_Lora] * 3
    w_o: torch.Tensor
    o: _Lora
    w_gu: torch.Tensor        # (2*intermediate, hidden), gate/up base weights are views of it
    gu: list                  # [_Lora] * 2
    w_down: torch.Tensor
    down: _Lora


@dataclass
class _FastState:
    device: str
    compiled: bool
    fused: bool = False
    reason: str = ""
    layers: list = field(default_factory=list)
    n_heads: int = 0
    n_kv: int = 0
    head_dim: int = 0
    eps: float = 1e-6
    attn_scale: float = 1.0
    layer_fns: list = field(default_factory=list)
    ce_chunk_fn: Any = None
    attention: str = "auto"    # auto (SDPA's own choice) | flash | cudnn | efficient
    lora_add: str = "inplace"  # inplace | inplace-fwd | addmm | add: see _lora_group
    recompute: bool = False    # activation checkpointing per fused layer (the model asked for it)
    varlen: bool = False       # packed batches: variable-length attention instead of a dense mask
    swiglu_kernel: bool = False  # kernels.swiglu: one-pass SwiGLU backward (Triton on CUDA)


def _lora_of(mod: nn.Module) -> Optional[_Lora]:
    """The single active, unmerged, plain LoRA adapter of a PEFT LoRA Linear, else None."""
    if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and hasattr(mod, "scaling")):
        return None
    if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
        return None
    active = list(getattr(mod, "active_adapters", []) or [])
    if len(active) != 1:
        return None
    name = active[0]
    if name not in mod.lora_A or getattr(mod, "use_dora", {}).get(name, False):
        return None
    if getattr(mod, "fan_in_fan_out", False) or type(mod.base_layer) is not nn.Linear:
        return None
    a, b = mod.lora_A[name], mod.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    drop = mod.lora_dropout[name]
    if isinstance(drop, nn.Dropout):
        p = float(drop.p)
    elif isinstance(drop, nn.Identity):
        p = 0.0
    else:
        return None
    return _Lora(A=a.weight, B=b.weight, scale=float(mod.scaling[name]), dropout=p)


def _concat_frozen(linears: list) -> torch.Tensor:
    """Concatenate frozen base weights (dim 0) and make each module's weight a view of the result."""
    ws = [m.weight for m in linears]
    cat = torch.cat([w.detach() for w in ws], dim=0)
    off = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = cat[off:off + n]
        off += n
    return cat


def _plan_layers(causal: nn.Module) -> tuple[Optional[list], str]:
    """Check the model is one the fused layer reproduces exactly; return per-layer tensors."""
    cfg = causal.config
    mt = getattr(cfg, "model_type", "")
    if mt not in _SUPPORTED_MODEL_TYPES:
        return None, f"model_type {mt!r} not in {_SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return None, "pretraining_tp > 1"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return None, "MLP is not SwiGLU without bias"
    if mt != "llama" and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return None, "sliding-window attention"
    if getattr(cfg, "attention_dropout", 0.0):
        return None, "attention dropout"
    dec = _decoder(causal)
    layers = []
    for i, layer in enumerate(dec.layers):
        att, mlp = layer.self_attn, layer.mlp
        for extra in ("q_norm", "k_norm"):
            if getattr(att, extra, None) is not None:
                return None, f"layer {i}: {extra}"
        q, k, v, o = (_lora_of(getattr(att, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        g, u, d = (_lora_of(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
        if None in (q, k, v, o, g, u, d):
            return None, f"layer {i}: not every linear has one plain active LoRA adapter"
        if o.A.shape[0] != q.A.shape[0] and False:  # ranks may differ; block_diag handles it
            pass
        bases = [getattr(att, n).base_layer for n in ("q_proj", "k_proj", "v_proj")]
        if any(b.weight.requires_grad for b in bases):
            return None, f"layer {i}: base weights are trainable"
        biases = [b.bias for b in bases]
        if any(x is None for x in biases) and any(x is not None for x in biases):
            return None, f"layer {i}: mixed q/k/v biases"
        if att.o_proj.base_layer.bias is not None:
            return None, f"layer {i}: o_proj bias"
        if not (isinstance(layer.input_layernorm, nn.Module) and hasattr(layer.input_layernorm, "weight")):
            return None, f"layer {i}: unexpected norm"
        layers.append((layer, (q, k, v), o, (g, u), d, biases[0] is not None))
    return layers, ""


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _lora_group(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], As, Bs, scales,
                dropouts, training: bool, lora_add: str = "inplace"):
    """x @ w.T (+ b) + [s_i * drop_i(x) @ A_i.T @ B_i.T]_i for projections sharing the input x.

    Without dropout the A matrices are one matmul (x is read once) and the B matrices one
    block-diagonal matmul. ``lora_add`` says where the LoRA term meets the base matmul:
    "inplace" - the base GEMM accumulates onto it (``lora_linear``: in forward and, for the
    input gradient, in backward; ``base_plus_lora`` where dropout or a bias rule that out),
    "inplace-fwd" - only in forward (``base_plus_lora``), "addmm" - in
    ``torch.addmm``'s epilogue (cuBLAS copies the addend into the output first), "add" - a plain
    add, which torch.compile fuses into the consumer (RoPE, SwiGLU, residual add). All three are
    the same sum; bench/README.md has their speeds on an H100.
    LoRA weights (often fp32 masters) are cast to the activation dtype, as autocast would.
    """
    dt = x.dtype
    no_dropout = not training or all(p == 0.0 for p in dropouts)
    if (lora_add == "inplace" and no_dropout and b is None and len(set(scales)) == 1
            and w.dtype == dt and not w.requires_grad):
        a = As[0].to(dt) if len(As) == 1 else torch.cat([a.to(dt) for a in As], dim=0)
        bb = Bs[0].to(dt) if len(Bs) == 1 else torch.block_diag(*[bm.to(dt) for bm in Bs])
        return torch.ops.tuneserve.lora_linear(x, w, a, bb.t(), scales[0])[0]
    if no_dropout:
        a = As[0].to(dt) if len(As) == 1 else torch.cat([a.to(dt) for a in As], dim=0)
        xa = x @ a.t()
        if len(set(scales)) == 1:
            xa = xa * scales[0]
        else:
            xa = torch.cat([t * s for t, s in zip(xa.split([a.shape[0] for a in As], -1), scales)], -1)
    else:
        xa = torch.cat([(F.dropout(x, p, True) if p else x) @ a.to(dt).t() * s
                        for a, s, p in zip(As, scales, dropouts)], dim=-1)
    bb = Bs[0].to(dt) if len(Bs) == 1 else torch.block_diag(*[bm.to(dt) for bm in Bs])
    if lora_add in ("inplace", "inplace-fwd") and b is None and w.dtype == dt and not w.requires_grad:
        return torch.ops.tuneserve.base_plus_lora(x, w, xa, bb.t())
    lora = xa @ bb.t()
    if b is not None:
        lora = lora + b
    if lora_add == "add":
        return x @ w.t() + lora
    return torch.addmm(lora, x, w.t())


def _layer_tensors(p: _LayerParams) -> tuple:
    """The flat tensor arguments of the compiled layer function (order matters)."""
    return (p.ln1, p.ln2, p.w_qkv, p.b_qkv, *[l.A for l in p.qkv], *[l.B for l in p.qkv],
            p.w_o, p.o.A, p.o.B, p.w_gu, *[l.A for l in p.gu], *[l.B for l in p.gu],
            p.w_down, p.down.A, p.down.B)


def _layer_meta(p: _LayerParams) -> tuple:
    """Static per-layer numbers (scales, dropouts); layers with equal meta share a compiled graph."""
    ls = [*p.qkv, p.o, *p.gu, p.down]
    return tuple(l.scale for l in ls), tuple(l.dropout for l in ls)


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


def _make_layer_fn(st: _FastState, meta: tuple):
    n_heads, n_kv, hd, eps, scale = st.n_heads, st.n_kv, st.head_dim, st.eps, st.attn_scale
    native_gqa = st.attention in ("auto", "flash")
    am, sk = st.lora_add, st.swiglu_kernel
    (s_q, s_k, s_v, s_o, s_g, s_u, s_d), (d_q, d_k, d_v, d_o, d_g, d_u, d_d) = meta

    def layer_fn(h, cos, sin, mask, training: bool, ln1, ln2, w_qkv, b_qkv, a_q, a_k, a_v,
                 b_q, b_k, b_v, w_o, a_o, b_o, w_gu, a_g, a_u, b_g, b_u, w_down, a_d, b_d):
        bsz, seq, hid = h.shape
        x = h.reshape(-1, hid)
        xn = _rms_norm(x, ln1, eps)
        qkv = _lora_group(xn, w_qkv, b_qkv, (a_q, a_k, a_v), (b_q, b_k, b_v), (s_q, s_k, s_v),
                          (d_q, d_k, d_v), training, am)
        q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
        q = q.view(bsz, seq, n_heads, hd).transpose(1, 2)
        k = k.view(bsz, seq, n_kv, hd).transpose(1, 2)
        v = v.view(bsz, seq, n_kv, hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + torch.cat((-q[..., hd // 2:], q[..., :hd // 2]), dim=-1) * s
        k = k * c + torch.cat((-k[..., hd // 2:], k[..., :hd // 2]), dim=-1) * s
        if mask is not None and mask.dtype == torch.int32:   # packed documents: cu_seqlens
            attn = _varlen_causal(q.transpose(1, 2).reshape(bsz * seq, n_heads, hd),
                                  k.transpose(1, 2).reshape(bsz * seq, n_kv, hd),
                                  v.transpose(1, 2).reshape(bsz * seq, n_kv, hd), mask, seq, scale)
            attn = attn.reshape(-1, n_heads * hd)
        else:
            gqa = n_kv != n_heads
            if gqa and (mask is not None or not native_gqa):
                rep = n_heads // n_kv
                k = k[:, :, None].expand(bsz, n_kv, rep, seq, hd).reshape(bsz, n_heads, seq, hd)
                v = v[:, :, None].expand(bsz, n_kv, rep, seq, hd).reshape(bsz, n_heads, seq, hd)
                gqa = False
            if mask is None:
                if gqa:
                    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                else:
                    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            attn = attn.transpose(1, 2).reshape(-1, n_heads * hd)
        x = x + _lora_group(attn, w_o, None, (a_o,), (b_o,), (s_o,), (d_o,), training, am)
        xn = _rms_norm(x, ln2, eps)
        gu = _lora_group(xn, w_gu, None, (a_g, a_u), (b_g, b_u), (s_g, s_u), (d_g, d_u), training, am)
        x = x + _lora_group(swiglu(gu, sk), w_down, None, (a_d,), (b_d,), (s_d,), (d_d,), training, am)
        return x.view(bsz, seq, hid)

    return layer_fn


def _install_fused(model: nn.Module, st: _FastState) -> None:
    causal = _causal_lm(model)
    plan, reason = _plan_layers(causal)
    if plan is None:
        st.reason = reason
        log.info("fastpath: fused LoRA layers off: %s", reason)
        return
    cfg = causal.config
    att0 = plan[0][0].self_attn
    st.n_heads = cfg.num_attention_heads
    st.n_kv = getattr(cfg, "num_key_value_heads", None) or st.n_heads
    st.head_dim = getattr(att0, "head_dim", None) or cfg.hidden_size // st.n_heads
    st.attn_scale = float(getattr(att0, "scaling", st.head_dim ** -0.5))
    st.eps = float(getattr(plan[0][0].input_layernorm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6)))
    for layer, (q, k, v), o, (g, u), d, has_bias in plan:
        att, mlp = layer.self_attn, layer.mlp
        qkv_base = [att.q_proj.base_layer, att.k_proj.base_layer, att.v_proj.base_layer]
        w_qkv = _concat_frozen(qkv_base)
        b_qkv = None
        if has_bias:
            b_qkv = torch.cat([b.bias.detach() for b in qkv_base])
            off = 0
            for b in qkv_base:
                n = b.bias.shape[0]
                b.bias.data = b_qkv[off:off + n]
                off += n
        w_gu = _concat_frozen([mlp.gate_proj.base_layer, mlp.up_proj.base_layer])
        st.layers.append(_LayerParams(
            ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
            w_qkv=w_qkv, b_qkv=b_qkv, qkv=[q, k, v], w_o=att.o_proj.base_layer.weight, o=o,
            w_gu=w_gu, gu=[g, u], w_down=mlp.down_proj.base_layer.weight, down=d))
    st.fused = True


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def optimize_for_training(model: nn.Module, *, device: str, compile: bool, force: bool = False,
                          attention: str = "auto", fuse_layers: bool = True,
                          lora_add: str = "inplace", varlen: Optional[bool] = None,
                          swiglu_kernel: Optional[bool] = None) -> nn.Module:
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
    True on CPU runs its torch reference).
    """
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
                    recompute=bool(getattr(_causal_lm(model), "is_gradient_checkpointing", False)))
    if fuse_layers:
        _install_fused(model, st)
        st.varlen = (bool(varlen) if varlen is not None else
                     dev == "cuda" and attention in ("auto", "flash")
                     and _varlen_available(st.attn_scale, st.head_dim))
        st.swiglu_kernel = (bool(swiglu_kernel) if swiglu_kernel is not None else
                            dev == "cuda" and kernels.triton is not None)
    else:
        st.reason = "fuse_layers=False"
    if compile:
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
    if st.fused:
        fns = {}
        for p in st.layers:
            meta = _layer_meta(p)
            if meta not in fns:
                fn = _make_layer_fn(st, meta)
                fns[meta] = torch.compile(fn, dynamic=False) if compile else fn
            st.layer_fns.append(fns[meta])
    setattr(model, _STATE_ATTR, st)
    return model


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
             f"swiglu={'kernel' if st.swiglu_kernel else 'compiled'}", f"recompute={st.recompute}"]
    return "fastpath: " + ", ".join(parts)


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


def _fused_hidden(model: nn.Module, st: _FastState, input_ids, attention_mask, position_ids,
                  masked: Optional[bool] = None):
    causal = _causal_lm(model)
    dec = _decoder(causal)
    bsz, seq = input_ids.shape
    h = dec.embed_tokens(input_ids)
    mask = _attention_mask_for(attention_mask, position_ids, bsz, seq, h.device, masked, st.varlen)
    if position_ids is None:
        position_ids = torch.arange(seq, device=h.device).unsqueeze(0).expand(bsz, seq)
    cos, sin = dec.rotary_emb(h, position_ids)
    training = model.training
    recompute = st.recompute and training and torch.is_grad_enabled()
    with _sdpa_context(st):
        for fn, p in zip(st.layer_fns, st.layers):
            if recompute:
                h = torch.utils.checkpoint.checkpoint(fn, h, cos, sin, mask, training, *_layer_tensors(p),
                                                      use_reentrant=False)
            else:
                h = fn(h, cos, sin, mask, training, *_layer_tensors(p))
    return dec.norm(h)


def _sdpa_context(st: _FastState):
    import contextlib
    if st.attention in ("flash", "cudnn", "efficient"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                             "efficient": SDPBackend.EFFICIENT_ATTENTION}[st.attention],
                            SDPBackend.MATH][:1 if st.device == "cuda" else 2])
    return contextlib.nullcontext()


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
