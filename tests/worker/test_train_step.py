"""TrainStep, the unit both the training loop and the throughput bench drive."""
from __future__ import annotations

import pytest

from tuneserve_workers.contract import AcceleratorRuntime, AdapterSpec, DatasetSpec

pytestmark = pytest.mark.worker


def _setup(tiny_model, grad_accum):
    import torch
    from tuneserve_workers.train.loop import TrainStep
    from tuneserve_workers.train.model import load_model
    torch.manual_seed(0)
    model = load_model(tiny_model, AdapterSpec(rank=4, alpha=8, dropout=0.0), AcceleratorRuntime(),
                       torch.device("cpu"), torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, TrainStep(model, opt, sched, grad_accum=grad_accum, clip=None)


def test_accumulated_micro_batches_equal_one_batch_per_token(tiny_model, tmp_path):
    """Two micro-batches with different numbers of answer tokens give the same step as one
    batch holding both: the loss is a per-token mean over the whole step, not a mean of means."""
    import torch
    from tuneserve_workers.testing.tiny import write_toy_dataset
    from tuneserve_workers.train.data import collate, prepare, read_dataset
    from tuneserve_workers.train.model import load_tokenizer
    spec = DatasetSpec(uri=write_toy_dataset(str(tmp_path / "d.jsonl"), repeat=2))
    data = prepare(read_dataset(spec), spec, load_tokenizer(tiny_model), max_len=64, pack=False, seed=0)
    pad = data.info["pad_id"]
    first, second = collate(data.train, [0], pad), collate(data.train, [1, 2, 3], pad)
    both = collate(data.train, [0, 1, 2, 3], pad)
    assert (first["labels"] != -100).sum() != (second["labels"] != -100).sum()

    model_a, step_a = _setup(tiny_model, grad_accum=2)
    model_b, step_b = _setup(tiny_model, grad_accum=1)
    m_a, m_b = step_a([first, second]), step_b(both)
    assert m_a["loss"] == pytest.approx(m_b["loss"], rel=1e-5)
    assert m_a["label_tokens"] == m_b["label_tokens"] and m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-4)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)
    assert step_a([first, second])["loss"] < m_a["loss"]     # and it learns
