"""fastpath.causal_lm_loss and the fused LoRA layers agree with plain transformers + PEFT.

Tiny random Llama/Qwen2-shaped models in fp32 on the CPU (no downloads): the chunked linear
cross-entropy must give the same loss and LoRA gradients as ``model(..., labels=...)``, and the
fused decoder layers (forced on CPU, not compiled) the same as PEFT's layers, for plain, packed
and padded batches.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.worker

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

try:
    from tuneserve_workers.train import fastpath
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "workers"))
    from tuneserve_workers.train import fastpath

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(kind: str = "llama", dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)       # q/k/v carry biases
    model.config._attn_implementation = "sdpa"
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                           init_lora_weights=False)       # B != 0, so LoRA changes the output
    return peft.get_peft_model(model, lora).float()


def batch(seed: int = 1, b: int = 2, s: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100           # a prompt that is not trained on
    return {"input_ids": ids, "labels": labels}


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference(model, b):
    """Plain transformers loss (mean over label tokens) and the LoRA grads of that mean."""
    model.zero_grad(set_to_none=True)
    kwargs = {k: v for k, v in b.items() if k != "labels"}
    out = model(**kwargs, labels=b["labels"])
    out.loss.backward()
    return out.loss.detach(), lora_grads(model)


def ours(model, b):
    model.zero_grad(set_to_none=True)
    loss_sum, n = fastpath.causal_lm_loss(model, b)
    (loss_sum / n).backward()
    return (loss_sum / n).detach(), lora_grads(model), int(n)


def assert_grads_close(g1, g2, rtol=1e-4, atol=1e-6):
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk_bytes", [fastpath._CE_CHUNK_BYTES, 2 * 320 * 24])
def test_causal_lm_loss_equals_transformers_loss(monkeypatch, chunk_bytes):
    # 24-token chunks: 80 tokens -> 3 full chunks and a partial one
    monkeypatch.setattr(fastpath.cross_entropy, "_CE_CHUNK_BYTES", chunk_bytes)
    model = tiny_model()
    b = batch()
    ref_loss, ref_grads = reference(model, b)
    loss, grads, n = ours(model, b)
    assert n == 2 * 39 - 6        # shifted labels: row 0 loses 7 prompt labels + last, row 1 last
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_optimize_is_noop_on_cpu_unless_forced():
    model = tiny_model()
    assert fastpath.optimize_for_training(model, device="cpu", compile=True) is model
    assert getattr(model, fastpath._STATE_ATTR, None) is None


@pytest.mark.parametrize("kind,lora_add", [("llama", "inplace"), ("qwen2", "inplace"), ("llama", "inplace-fwd"),
                                           ("llama", "addmm"), ("llama", "add")])
def test_fused_layers_match_peft(kind, lora_add):
    plain = tiny_model(kind)
    fused = copy.deepcopy(plain)
    fastpath.optimize_for_training(fused, device="cpu", compile=False, force=True, lora_add=lora_add)
    st = getattr(fused, fastpath._STATE_ATTR)
    assert st.fused, st.reason
    b = batch()
    ref_loss, ref_grads = reference(plain, b)
    loss, grads, _ = ours(fused, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    # the base weights are now views of the concatenated matrices: PEFT's own forward still agrees
    loss2, _ = reference(fused, b)
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-5, atol=1e-6)
    attn = fused.get_base_model().model.layers[0].self_attn
    assert attn.k_proj.base_layer.weight.data_ptr() > attn.q_proj.base_layer.weight.data_ptr()


def packed_batch():
    """Row 0: documents of 20 and 28 tokens; row 1: 48 tokens. Labels -100 at document starts."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 320, (2, 48), generator=g)
    pos = torch.stack([torch.cat([torch.arange(20), torch.arange(28)]), torch.arange(48)])
    labels = ids.clone()
    labels[0, 20] = -100           # the first token of document 2 is not predicted from document 1
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def separate_docs_loss(model, b):
    """Ground truth for packing: every document on its own, summed."""
    ids, labels = b["input_ids"], b["labels"]
    total, n = 0.0, 0
    for row, spans in ((0, [(0, 20), (20, 48)]), (1, [(0, 48)])):
        for s, e in spans:
            lab = labels[row:row + 1, s:e].clone()
            lab[0, 0] = -100
            out = model(input_ids=ids[row:row + 1, s:e], labels=lab)
            k = int((lab[0, 1:] != -100).sum())
            total, n = total + out.loss.item() * k, n + k
    return total, n


@pytest.mark.parametrize("mode", ["peft", "fused-mask", "fused-varlen"])
def test_packed_sequences_do_not_attend_across_documents(mode):
    model = tiny_model()
    if mode != "peft":
        fastpath.optimize_for_training(model, device="cpu", compile=False, force=True,
                                       varlen=mode == "fused-varlen")
        assert f"packed={mode.split('-')[1]}" in fastpath.fastpath_summary(model)
    b = packed_batch()
    with torch.no_grad():
        ref_sum, ref_n = separate_docs_loss(model, b)
        loss_sum, n = fastpath.causal_lm_loss(model, b)
    assert int(n) == ref_n
    assert loss_sum.item() == pytest.approx(ref_sum, rel=1e-5)


def test_swiglu_one_pass_backward_matches_autograd():
    from tuneserve_workers.train import kernels
    torch.manual_seed(0)
    gu = torch.randn(5, 3, 2 * 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 3, 24, dtype=torch.float64)
    g, u = gu.chunk(2, dim=-1)
    (torch.nn.functional.silu(g) * u).backward(dy)
    expected = gu.grad.clone()
    gu.grad = None
    out = kernels.swiglu(gu, kernel=True)
    torch.testing.assert_close(out, kernels.swiglu(gu.detach(), kernel=False))
    out.backward(dy)
    torch.testing.assert_close(gu.grad, expected)


def test_fused_layers_with_the_swiglu_kernel_match_peft():
    plain = tiny_model()
    fused = copy.deepcopy(plain)
    fastpath.optimize_for_training(fused, device="cpu", compile=False, force=True, swiglu_kernel=True)
    assert "swiglu=kernel" in fastpath.fastpath_summary(fused)
    b = batch()
    ref_loss, ref_grads = reference(plain, b)
    loss, grads, _ = ours(fused, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_varlen_and_mask_give_the_same_gradients():
    """Packed rows through per-document (varlen) attention and through the dense document mask:
    the same loss and LoRA gradients (on CUDA the varlen side is torch's flash kernel; the
    benchmark compares the two there)."""
    masked = tiny_model()
    varlen = copy.deepcopy(masked)
    fastpath.optimize_for_training(masked, device="cpu", compile=False, force=True, varlen=False)
    fastpath.optimize_for_training(varlen, device="cpu", compile=False, force=True, varlen=True)
    b = packed_batch()
    ref_loss, ref_grads, _ = ours(masked, b)
    loss, grads, _ = ours(varlen, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_document_offsets_of_a_packed_batch():
    # row 0: a tail of a document (positions 5..7) then two documents; row 1: one document
    pos = torch.tensor([[5, 6, 7, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    cu = fastpath._attention_mask_for(None, pos, 2, 8, "cpu", varlen=True)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8, 16]
    unpacked = torch.arange(8).expand(2, 8)
    assert fastpath._attention_mask_for(None, unpacked, 2, 8, "cpu", varlen=True) is None
    dense = fastpath._attention_mask_for(None, pos, 2, 8, "cpu", masked=True, varlen=True)
    assert dense.dtype == torch.bool and dense.shape == (2, 1, 8, 8)   # CUDA graphs: static shapes


def test_padded_batch_matches_peft():
    plain = tiny_model()
    fused = copy.deepcopy(plain)
    fastpath.optimize_for_training(fused, device="cpu", compile=False, force=True)
    b = batch()
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    b["attention_mask"][1, 30:] = 0                  # right padding
    b["labels"][1, 30:] = -100
    ref_loss, ref_grads = reference(plain, b)
    loss, grads, _ = ours(fused, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_lora_dropout_is_applied_in_train_mode_only():
    plain = tiny_model(dropout=0.3)
    fused = copy.deepcopy(plain)
    fastpath.optimize_for_training(fused, device="cpu", compile=False, force=True)
    assert getattr(fused, fastpath._STATE_ATTR).fused
    b = batch()
    plain.eval(), fused.eval()
    with torch.no_grad():
        ref = plain(**b).loss
        s, n = fastpath.causal_lm_loss(fused, b)
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-6)
    fused.train()
    torch.manual_seed(0)
    with torch.no_grad():
        s1, _ = fastpath.causal_lm_loss(fused, b)
        s2, _ = fastpath.causal_lm_loss(fused, b)
    assert s1.item() != s2.item()                      # fresh dropout masks each call
    assert abs(s1.item() / int(n) - ref.item()) < 0.5  # ...around the same loss


@pytest.mark.parametrize("fused", [False, True])
def test_value_blind_mask_choice_gives_the_same_loss(fused):
    """``masked=`` (what a CUDA graph uses: no look at the batch's values) gives the same loss as
    the data-driven choice, for packed rows and for a row that is one whole document."""
    model = tiny_model()
    if fused:
        fastpath.optimize_for_training(model, device="cpu", compile=False, force=True)
    packed = packed_batch()
    single = dict(batch(), position_ids=torch.arange(40).expand(2, 40).contiguous())
    with torch.no_grad():
        for b in (packed, single):
            ref, n_ref = fastpath.causal_lm_loss(model, b)
            forced, n = fastpath.causal_lm_loss(model, b, masked=True)
            assert int(n) == int(n_ref)
            torch.testing.assert_close(forced, ref, rtol=1e-5, atol=1e-5)
        plain, _ = fastpath.causal_lm_loss(model, single, masked=False)
        torch.testing.assert_close(plain, fastpath.causal_lm_loss(model, single)[0], rtol=1e-5, atol=1e-5)


def saved_activation_bytes(model, b):
    """Bytes autograd keeps for backward during one forward (what activation memory is made of)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, n = fastpath.causal_lm_loss(model, b)
    return total, loss_sum / n


def test_fused_layers_honour_the_models_gradient_checkpointing():
    """With gradient checkpointing on (the FineTuneJob default) the fused layers recompute their
    activations in backward: far fewer bytes kept after forward, the same gradients."""
    plain = tiny_model()
    ckpt = copy.deepcopy(plain)
    ckpt.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused_plain, fused_ckpt = copy.deepcopy(plain), copy.deepcopy(ckpt)
    for m in (fused_plain, fused_ckpt):
        fastpath.optimize_for_training(m, device="cpu", compile=False, force=True)
    assert getattr(fused_ckpt, fastpath._STATE_ATTR).recompute
    assert not getattr(fused_plain, fastpath._STATE_ATTR).recompute
    b = batch(s=64)
    kept_plain, _ = saved_activation_bytes(fused_plain, b)
    kept_ckpt, _ = saved_activation_bytes(fused_ckpt, b)
    assert kept_ckpt < 0.5 * kept_plain, (kept_ckpt, kept_plain)
    ref_loss, ref_grads = reference(ckpt, b)
    loss, grads, _ = ours(fused_ckpt, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
