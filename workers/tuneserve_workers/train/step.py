"""The training step: the unit the training loop and the throughput bench both drive.

    step = TrainStep(model, optimizer, scheduler, grad_accum=4, clip=1.0, amp_dtype=torch.bfloat16)
    metrics = step([micro_batch_1, ..., micro_batch_4])   # or step(micro_batch) when grad_accum=1

Each micro-batch is a dict of tensors (``input_ids``, ``labels`` and ``position_ids`` or
``attention_mask``; see data.collate). One call does grad_accum forward/backward passes through
the loss (``fastpath.causal_lm_loss``, run by ``parallel.Parallel``: plain, inside DDP, or on
FSDP2-sharded layers), then one clipped optimizer step and one scheduler step. Gradients are
reduced by DDP or FSDP2 on the last micro-batch only. The loss is normalised by the label tokens of
the whole global step (all micro-batches, all ranks), so it is a true per-token mean however
tokens are spread. Returned metrics (Python numbers): ``loss`` (global per-token mean), ``tokens``
(input tokens this rank processed, packing padding included), ``global_tokens``, ``label_tokens``
(global), ``grad_norm``, ``lr``; all read back with one host sync per step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..contract import DataParallel
from .cudagraph import GraphedMicroStep
from .parallel import LossModule, Parallel, process_group


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (token counts and loss sums, not gradients)."""
    if process_group()[1] > 1:
        dist.all_reduce(t)
    return t


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) DTensor result, e.g. FSDP2's gradient norm."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TrainStep:
    """One optimizer step over ``grad_accum`` micro-batches (see the module docstring)."""

    def __init__(self, model, optimizer, scheduler, *, grad_accum: int, clip: float | None,
                 amp_dtype: torch.dtype | None = None, loss_fn=None, cuda_graphs: bool = False,
                 parallel: Parallel | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.clip, self.amp_dtype = grad_accum, clip, amp_dtype
        self.parallel = parallel or Parallel(DataParallel.replicated, model, LossModule(model, loss_fn))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        # cudagraph.py: replayed forward+backward for static shapes (CUDA, default loss only, and
        # only unwrapped: a captured backward would not run DDP's or FSDP2's reductions).
        self.graphs = (GraphedMicroStep(model, self.params, self.device, self._amp)
                       if cuda_graphs and self.device.type == "cuda" and loss_fn is None
                       and not self.parallel.wrapped else None)

    def _amp(self):
        return (torch.autocast(self.device.type, dtype=self.amp_dtype)
                if self.amp_dtype is not None else contextlib.nullcontext())

    def __call__(self, batch) -> dict:
        micro = [batch] if isinstance(batch, Mapping) else list(batch)
        if len(micro) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches, got {len(micro)}")
        micro = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro]
        local = torch.stack([(mb["labels"][:, 1:] != -100).sum() for mb in micro]).sum()
        tokens = torch.stack([mb["attention_mask"].sum() if "attention_mask" in mb
                              else torch.tensor(mb["input_ids"].numel(), device=self.device)
                              for mb in micro]).sum()
        counts = all_sum(torch.stack([local, tokens]).float())
        scale = self.parallel.grad_scale / counts[0].clamp(min=1)
        loss_total = torch.zeros((), device=self.device)
        graphed = self.graphs is not None and self.graphs.prepare(micro[0])
        for i, mb in enumerate(micro):
            if graphed and self.graphs.matches(mb):
                loss_total += self.graphs.run(mb, scale)
                continue
            with self.parallel.accumulating(sync=i == len(micro) - 1):
                with self._amp():
                    loss_sum, _ = self.parallel.loss(mb)
                (loss_sum * scale).backward()
            loss_total += loss_sum.detach().float()
        grad_norm = self._grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        # A captured graph adds into the existing .grad tensors: keep them, zeroed.
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
        loss_total = all_sum(loss_total)
        # One host sync for all metrics.
        loss, n_label, n_global, n_local, gnorm = torch.stack([
            loss_total / counts[0].clamp(min=1), counts[0], counts[1], tokens.float(),
            grad_norm.float()]).tolist()
        return {"loss": loss, "tokens": int(n_local), "global_tokens": int(n_global),
                "label_tokens": int(n_label), "grad_norm": gnorm, "lr": lr}

    def _grad_norm(self) -> torch.Tensor:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.clip:
            return _full(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        return _full(torch.nn.utils.get_total_norm([p.grad for p in self.params]))
