"""The FP8 frozen base (fastpath/fp8.py, ``TrainingSpec.base_precision: fp8``) on the CPU.

CI has no FP8 matrix units: on the CPU the same e4m3 operands and scales are dequantized and
multiplied in fp32, so these tests hold the quantization, the scales (both directions) and the
autograd wiring to float64 references; bench/train_throughput.py runs ``torch._scaled_mm`` on a
GPU. Expected error, fixed before measuring: e4m3 keeps 3 mantissa bits, so rounding both
operands of a GEMM to it (per-row scales) leaves ~2^-4/sqrt(3) ~ 3.6 % relative error per
element and about 3.6-5 % in ||out - ref|| / ||ref||; bf16 operands give ~0.3 %.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.worker

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tuneserve_workers.contract import (AcceleratorRuntime, BasePrecision, CheckpointSpec,  # noqa: E402
                                        DataParallel, DatasetSpec, ModelSource, TrainingSpec,
                                        TrainJobConfig)
from tuneserve_workers.train import fastpath  # noqa: E402
from tuneserve_workers.train.errors import ConfigError  # noqa: E402
from tuneserve_workers.train.fastpath import fp8  # noqa: E402
from tuneserve_workers.train.main import _preflight_fp8  # noqa: E402

from test_fastpath import batch, ours, tiny_model  # noqa: E402


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("rows,cols,spread", [(64, 256, 1.0), (33, 112, 1e-3), (8, 64, 1e4)])
def test_row_quantization_keeps_e4m3_precision_at_any_scale(rows, cols, spread):
    torch.manual_seed(rows)
    t = torch.randn(rows, cols) * spread * torch.logspace(-2, 2, rows).unsqueeze(1)  # rows 4 decades apart
    t8, scale = fp8.quantize_rows(t)
    assert t8.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    back = t8.float() * scale
    assert torch.isfinite(back).all()
    # each row uses the full e4m3 range: its largest element maps to 448
    assert torch.allclose(t8.float().abs().amax(dim=1), torch.full((rows,), 448.0))
    assert 0.01 < rel_err(back, t) < 0.05


@pytest.mark.parametrize("m,k,n", [(64, 256, 384), (40, 1024, 112)])
def test_fp8_linear_forward_and_input_gradient_match_float64(m, k, n):
    torch.manual_seed(m + k)
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5 * torch.logspace(-1, 1, n, dtype=torch.float64).unsqueeze(1)
    grad = torch.randn(m, n, dtype=torch.float64)
    ref = x @ w.t()
    ref.backward(grad)
    w8, w_scale = fp8.quantize_weight(w.float())
    assert w8.dtype == torch.float8_e4m3fn and w_scale.shape == (1, n)
    xf = x.detach().float().requires_grad_()
    out = fp8.fp8_matmul(xf, w8, w_scale)
    out.backward(grad.float())
    # the forward and the input gradient both carry FP8 rounding, and only that
    assert 0.01 < rel_err(out, ref) < 0.06
    assert 0.01 < rel_err(xf.grad, x.grad) < 0.06


def fp8_model(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    return fastpath.optimize_for_training(model, device="cpu", compile=False, force=True, base_precision="fp8")


def test_fused_layers_with_an_fp8_base_follow_the_full_precision_model():
    b = batch()
    ref_loss, ref_grads, _ = ours(fastpath.optimize_for_training(tiny_model("llama"), device="cpu", compile=False,
                                                                 force=True), b)
    model = fp8_model()
    st = getattr(model, fastpath._STATE_ATTR)
    assert "base=fp8" in fastpath.fastpath_summary(model)
    for p in st.layers:
        assert p.w_qkv.dtype == p.w_gu.dtype == p.w_o.dtype == p.w_down.dtype == torch.float8_e4m3fn
        assert p.ws_qkv.shape == (1, p.w_qkv.shape[0])
    # the 16-bit originals are gone: the base costs one byte per weight
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.numel() == 0
    loss, grads, _ = ours(model, b)
    assert abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()
    assert grads.keys() == ref_grads.keys()
    for name in grads:   # every LoRA gradient points the same way as in full precision
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.98, name


def _train(base_precision, steps: int = 20) -> list[float]:
    model = fastpath.optimize_for_training(tiny_model("llama", seed=3), device="cpu", compile=False, force=True,
                                           base_precision=base_precision)
    b = batch(seed=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = ours(model, b)
        opt.step()
        losses.append(loss.item())
    return losses


def test_an_fp8_base_trains_like_the_full_precision_one():
    full, base8 = _train(None), _train("fp8")
    assert base8[-1] < base8[0] - 0.1          # it learns
    for step, (a, b) in enumerate(zip(full, base8)):   # and follows the full-precision curve
        assert abs(a - b) <= 0.03 * a, f"step {step}: {b} vs {a}"


def test_an_fp8_base_needs_the_fused_layers():
    with pytest.raises(ValueError, match="fused LoRA layers.*fuse_layers=False"):
        fastpath.optimize_for_training(tiny_model("llama"), device="cpu", compile=False, force=True,
                                       fuse_layers=False, base_precision="fp8")


def _cfg(**accelerator) -> TrainJobConfig:
    return TrainJobConfig(job_name="fp8", base_model=ModelSource(uri="/models/base"),
                          dataset=DatasetSpec(uri="/data/train.jsonl"),
                          checkpoint=CheckpointSpec(uri="/out/checkpoints"), output_uri="/out",
                          training=TrainingSpec(base_precision=BasePrecision.fp8),
                          accelerator=AcceleratorRuntime(torch_device="cuda", **accelerator))


@pytest.mark.parametrize("accelerator,message", [
    ({"vendor": "nvidia", "product": "a100-80gb", "supports_fp8": False},
     "base_precision fp8 needs FP8 matmuls, which accelerator nvidia/a100-80gb does not have"),
    ({"vendor": "nvidia", "product": "h100-80gb", "supports_fp8": True, "data_parallel": DataParallel.sharded},
     "fused layers, which are off when data_parallel is sharded"),
])
def test_the_worker_refuses_an_fp8_base_it_cannot_run(accelerator, message):
    with pytest.raises(ConfigError, match=message):
        _preflight_fp8(_cfg(**accelerator))


def test_the_worker_accepts_an_fp8_base_on_an_fp8_device():
    _preflight_fp8(_cfg(vendor="nvidia", product="h100-80gb", supports_fp8=True))
