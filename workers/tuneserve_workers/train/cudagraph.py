"""A micro-batch's forward and backward, captured once as a CUDA graph and replayed.

Why: the fused, compiled step still launches ~2,000 kernels per step, and the gaps between them
cost ~2% of an H100's time even when the host is never behind (bench/README.md). Replaying one
graph runs them back to back. Only static shapes qualify: packing gives them (every packed row is
``max_seq_length`` tokens), but only with the dense document mask - the variable-length attention
that packed rows use on CUDA depends on the number of documents - so the training loop turns this
on only for packed data on CUDA without varlen (it measured -0.2% to +2.6%, varlen +13.6%).

How: after ``warmup`` eager steps of one batch shape (torch.compile has compiled by then), the
next step captures ``causal_lm_loss`` + backward with static input buffers and a static loss
scale. The captured backward adds into the parameters' existing ``.grad`` tensors, so gradient
accumulation over micro-batches works unchanged as long as the caller zeroes grads in place
(``zero_grad(set_to_none=False)``). One graph per step object: batches of another shape run
eagerly. A failed capture (an op that syncs with the host, say) turns graphs off with a warning;
it never fails training.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from . import fastpath

log = logging.getLogger(__name__)


def batch_key(mb: dict) -> tuple:
    """What a graph is specialised to: the batch's keys, shapes and dtypes (not its values)."""
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in mb.items()))


class GraphedMicroStep:
    """Forward+backward of one micro-batch as a replayed CUDA graph (see the module docstring)."""

    def __init__(self, model, params: list, device: torch.device, amp: Callable, warmup: int = 2):
        self.model, self.params, self.device, self.amp, self.warmup = model, params, device, amp, warmup
        self.seen: dict = {}
        self.key: Optional[tuple] = None
        self.disabled: Optional[str] = None
        self._graph = self._static = self._scale = self._loss = None
        self._grads: list = []

    def prepare(self, mb: dict) -> bool:
        """Call at the start of a step (grads zero): True when ``mb``'s shape has a graph now."""
        if self.disabled:
            return False
        key = batch_key(mb)
        if self._graph is not None:
            return key == self.key
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= self.warmup:
            return False
        try:
            self._capture(mb, key)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager steps
            self._graph = None
            self.disabled = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed, training continues without graphs: %s", self.disabled)
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()
            return False
        log.info("captured the micro-batch forward+backward as a CUDA graph for %s", key)
        return True

    def matches(self, mb: dict) -> bool:
        return self._graph is not None and batch_key(mb) == self.key

    def run(self, mb: dict, scale: torch.Tensor) -> torch.Tensor:
        """Replay on ``mb``; the grads of ``loss_sum * scale`` are added to ``.grad``. Returns
        the loss sum (a buffer the next replay overwrites: use it before then)."""
        for k, v in self._static.items():
            v.copy_(mb[k], non_blocking=True)
        self._scale.copy_(scale)
        for p, g in zip(self.params, self._grads):
            if p.grad is not g:            # someone replaced .grad: carry its value over
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
                p.grad = g
        self._graph.replay()
        return self._loss

    def _capture(self, mb: dict, key: tuple) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads = [p.grad for p in self.params]
        static = {k: v.to(self.device).clone() for k, v in mb.items()}
        scale = torch.zeros((), dtype=torch.float32, device=self.device)
        # A graph cannot branch on data: choose the attention mask from which keys are present.
        masked = "position_ids" in static or "attention_mask" in static

        def fwd_bwd():
            with self.amp():
                loss_sum, _ = fastpath.causal_lm_loss(self.model, static, masked=masked)
            (loss_sum * scale).backward()
            return loss_sum.detach().float()

        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()          # the eager steps' cached blocks; the graph has its own pool
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):     # settle lazy init off the capture stream; scale 0 adds 0
            fwd_bwd()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = fwd_bwd()
        if any(p.grad is not g for p, g in zip(self.params, self._grads)):
            raise RuntimeError("the captured backward did not accumulate into the existing .grad tensors")
        for g in self._grads:             # capture only records; zero anyway (warm-up added 0 * grad)
            g.zero_()
        self._graph, self._static, self._scale, self._loss, self.key = graph, static, scale, loss, key
