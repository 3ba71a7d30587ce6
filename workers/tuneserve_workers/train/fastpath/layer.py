"""The fused LoRA decoder layer: planning (is the model one the fused layer reproduces exactly),
install (concatenated frozen weights, per-layer tensors), and the layer function itself.

Llama / Mistral / Qwen2-shaped models with PEFT LoRA on q,k,v,o,gate,up,down: the frozen q/k/v
weights are concatenated into one matrix (and gate/up into another; the original parameters
become views of it, so nothing is copied twice and adapters still save and merge as before), the
LoRA A matrices of projections that share an input are applied as one matmul, the LoRA B
matrices as one block-diagonal matmul, and the whole layer is one function of tensors that
``torch.compile`` fuses and compiles once for all layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8, lora_ops  # noqa: F401 - registers torch.ops.tuneserve.*
from .attention import _attention_mask_for, _sdpa_context, _varlen_causal
from ..kernels import swiglu

log = logging.getLogger(__name__)

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    # FP8 base (fp8.py): the w_* above are e4m3 and these their (1, out) row scales; else None
    ws_qkv: Optional[torch.Tensor] = None
    ws_o: Optional[torch.Tensor] = None
    ws_gu: Optional[torch.Tensor] = None
    ws_down: Optional[torch.Tensor] = None


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
    base_precision: Optional[str] = None   # "fp8": the frozen base in FP8 (fp8.py); None: as loaded


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
                dropouts, training: bool, lora_add: str = "inplace", w_scale: Optional[torch.Tensor] = None):
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
    ``w_scale`` given: ``w`` is the FP8 base (fp8.py) and its row scales; the LoRA term is added.
    """
    dt = x.dtype
    no_dropout = not training or all(p == 0.0 for p in dropouts)
    if w_scale is not None:   # FP8 base (fp8.py): its GEMM cannot accumulate onto the LoRA term
        out = fp8.fp8_matmul(x, w, w_scale) + _lora_xa(x, As, scales, dropouts, no_dropout) @ _lora_bt(Bs, dt)
        return out if b is None else out + b
    if (lora_add == "inplace" and no_dropout and b is None and len(set(scales)) == 1
            and w.dtype == dt and not w.requires_grad):
        a = As[0].to(dt) if len(As) == 1 else torch.cat([a.to(dt) for a in As], dim=0)
        return torch.ops.tuneserve.lora_linear(x, w, a, _lora_bt(Bs, dt), scales[0])[0]
    xa = _lora_xa(x, As, scales, dropouts, no_dropout)
    bt = _lora_bt(Bs, dt)
    if lora_add in ("inplace", "inplace-fwd") and b is None and w.dtype == dt and not w.requires_grad:
        return torch.ops.tuneserve.base_plus_lora(x, w, xa, bt)
    lora = xa @ bt
    if b is not None:
        lora = lora + b
    if lora_add == "add":
        return x @ w.t() + lora
    return torch.addmm(lora, x, w.t())


def _lora_xa(x: torch.Tensor, As, scales, dropouts, no_dropout: bool) -> torch.Tensor:
    """``[s_i * drop_i(x) @ A_i.T]_i`` concatenated: one matmul over x when there is no dropout."""
    dt = x.dtype
    if not no_dropout:
        return torch.cat([(F.dropout(x, p, True) if p else x) @ a.to(dt).t() * s
                          for a, s, p in zip(As, scales, dropouts)], dim=-1)
    a = As[0].to(dt) if len(As) == 1 else torch.cat([a.to(dt) for a in As], dim=0)
    xa = x @ a.t()
    if len(set(scales)) == 1:
        return xa * scales[0]
    return torch.cat([t * s for t, s in zip(xa.split([a.shape[0] for a in As], -1), scales)], -1)


def _lora_bt(Bs, dt: torch.dtype) -> torch.Tensor:
    """The B matrices as one block-diagonal (rank-sum, out-sum) matrix, transposed for ``xa @ bt``."""
    bb = Bs[0].to(dt) if len(Bs) == 1 else torch.block_diag(*[bm.to(dt) for bm in Bs])
    return bb.t()


def _layer_tensors(p: _LayerParams) -> tuple:
    """The flat tensor arguments of the compiled layer function (order matters)."""
    return (p.ln1, p.ln2, p.w_qkv, p.b_qkv, *[l.A for l in p.qkv], *[l.B for l in p.qkv],
            p.w_o, p.o.A, p.o.B, p.w_gu, *[l.A for l in p.gu], *[l.B for l in p.gu],
            p.w_down, p.down.A, p.down.B, p.ws_qkv, p.ws_o, p.ws_gu, p.ws_down)


def _layer_meta(p: _LayerParams) -> tuple:
    """Static per-layer numbers (scales, dropouts); layers with equal meta share a compiled graph."""
    ls = [*p.qkv, p.o, *p.gu, p.down]
    return tuple(l.scale for l in ls), tuple(l.dropout for l in ls)


def _make_layer_fn(st: _FastState, meta: tuple):
    n_heads, n_kv, hd, eps, scale = st.n_heads, st.n_kv, st.head_dim, st.eps, st.attn_scale
    native_gqa = st.attention in ("auto", "flash")
    am, sk = st.lora_add, st.swiglu_kernel
    (s_q, s_k, s_v, s_o, s_g, s_u, s_d), (d_q, d_k, d_v, d_o, d_g, d_u, d_d) = meta

    def layer_fn(h, cos, sin, mask, training: bool, ln1, ln2, w_qkv, b_qkv, a_q, a_k, a_v,
                 b_q, b_k, b_v, w_o, a_o, b_o, w_gu, a_g, a_u, b_g, b_u, w_down, a_d, b_d,
                 ws_qkv=None, ws_o=None, ws_gu=None, ws_down=None):
        bsz, seq, hid = h.shape
        x = h.reshape(-1, hid)
        xn = _rms_norm(x, ln1, eps)
        qkv = _lora_group(xn, w_qkv, b_qkv, (a_q, a_k, a_v), (b_q, b_k, b_v), (s_q, s_k, s_v),
                          (d_q, d_k, d_v), training, am, ws_qkv)
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
        x = x + _lora_group(attn, w_o, None, (a_o,), (b_o,), (s_o,), (d_o,), training, am, ws_o)
        xn = _rms_norm(x, ln2, eps)
        gu = _lora_group(xn, w_gu, None, (a_g, a_u), (b_g, b_u), (s_g, s_u), (d_g, d_u), training, am, ws_gu)
        x = x + _lora_group(swiglu(gu, sk), w_down, None, (a_d,), (b_d,), (s_d,), (d_d,), training, am, ws_down)
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
        if st.base_precision == "fp8":
            _quantize_base(st.layers[-1], layer)
    st.fused = True


def _quantize_base(p: _LayerParams, layer: nn.Module) -> None:
    """Swap one layer's frozen base weights for FP8 copies (fp8.py) and free the originals, so
    the base costs ~1 byte per weight; the PEFT modules keep empty base weights."""
    p.w_qkv, p.ws_qkv = fp8.quantize_weight(p.w_qkv)
    p.w_o, p.ws_o = fp8.quantize_weight(p.w_o)
    p.w_gu, p.ws_gu = fp8.quantize_weight(p.w_gu)
    p.w_down, p.ws_down = fp8.quantize_weight(p.w_down)
    att, mlp = layer.self_attn, layer.mlp
    for mod in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        fp8.release_bf16(mod.base_layer.weight)



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

