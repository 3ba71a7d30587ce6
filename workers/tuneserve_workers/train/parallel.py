"""Data parallelism over every device a job pays for: one process per device, torch's DDP or FSDP2.

The operator's sizing decides the mode per placement (``contract.DataParallel``) and the worker
does what it says:

* ``replicated``: every rank holds the whole frozen base; ``DistributedDataParallel`` wraps a
  module whose forward *is* the training loss (``fastpath.causal_lm_loss``), so the fast path
  (fused layers, chunked cross-entropy) runs inside DDP's forward and DDP's bucketed all-reduce of
  the adapter gradients overlaps backward.
* ``sharded``: FSDP2 ``fully_shard`` on every decoder layer, over all ranks: the frozen base and the
  adapter of each layer are sharded and gathered one layer at a time (the next one prefetched);
  gradients are reduce-scattered. The input embedding, the final norm and the output head stay
  whole on every rank (the chunked loss reads the head's weight directly). The fused layers read
  weights outside the layers' forward, so they are off in this mode; compiled per-layer code and
  the chunked loss stay.

Both average gradients over ranks; ``grad_scale`` (the world size when wrapped) makes the loss
scale ``world / global label tokens`` so the result is the per-token mean of the whole global batch,
as in a one-process run. With no process group, or one process and ``replicated``, nothing is
wrapped (there is nobody to reduce with); ``wrap_single`` forces DDP there (the bench does, to
measure the wrapper's own cost).

Checkpoints are independent of the world size and of the mode: the adapter is saved whole (PEFT
files), the optimizer state whole and keyed by parameter name (``torch.distributed.checkpoint``'s
full state dicts), so a run resumes on any number of devices and workers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..contract import DataParallel
from . import fastpath


def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LossModule(nn.Module):
    """A module whose forward is the training loss, so DDP's forward runs the fast path."""

    def __init__(self, model: nn.Module, loss_fn=None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn or fastpath.causal_lm_loss

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(self.model, batch)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a (PEFT-wrapped) transformers causal LM: the units FSDP2 shards."""
    dec = fastpath._decoder(fastpath._causal_lm(model))
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise ValueError(f"{type(dec).__name__} has no .layers; cannot shard it layer by layer")
    return list(layers)


@dataclass
class Parallel:
    """How one rank takes part in data-parallel training (see the module docstring)."""
    mode: DataParallel
    model: nn.Module                       # the PEFT model (sharded in place in FSDP2 mode)
    runner: nn.Module                      # what computes the loss: DDP(LossModule) or LossModule
    rank: int = 0
    world: int = 1
    wrapped: bool = False
    sharded_modules: list = field(default_factory=list)

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks; scale the loss back to a sum."""
        return float(self.world) if self.wrapped else 1.0

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner(batch)

    def accumulating(self, sync: bool):
        """Context for one micro-batch: gradients are reduced only when ``sync`` (the last)."""
        if sync or not self.wrapped:
            return contextlib.nullcontext()
        if self.mode is DataParallel.sharded:
            return _fsdp_no_sync(self.sharded_modules)
        return self.runner.no_sync()

    def adapter_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The whole adapter (trainable parameters by name, on CPU) on rank 0, None elsewhere.
        A collective in FSDP2 mode: every rank must call it."""
        out = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if self.rank == 0:
                out[name] = full.detach().to("cpu", copy=True)
        return out if self.rank == 0 else None

    def optimizer_state(self, optimizer) -> dict:
        """The whole optimizer state keyed by parameter name (a collective in FSDP2 mode)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a whole, name-keyed optimizer state, whatever world size or mode saved it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _fsdp_no_sync(modules):
    for m in modules:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True)


def setup_parallel(model: nn.Module, mode: DataParallel, device: torch.device, *,
                   param_dtype: Optional[torch.dtype] = None, wrap_single: bool = False,
                   loss_fn=None) -> Parallel:
    """Wrap ``model`` (PEFT, adapters added, fast path prepared) for this process group.

    ``param_dtype``: the compute dtype of FSDP2's gathered parameters (the autocast dtype; None
    keeps each parameter's own dtype). Call before building the optimizer: FSDP2 replaces the
    parameters with their shards."""
    rank, world = process_group()
    runner = LossModule(model, loss_fn)
    if mode is DataParallel.sharded:
        if world == 1 and not dist.is_initialized():
            raise ValueError("dataParallel sharded needs a process group (torch.distributed)")
        return _shard(model, runner, device, param_dtype, rank, world)
    if world == 1 and not (wrap_single and dist.is_initialized()):
        return Parallel(mode, model, runner, rank, world)
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    ddp = DistributedDataParallel(runner, device_ids=ids, gradient_as_bucket_view=True,
                                  **_no_buffer_sync(DistributedDataParallel))
    return Parallel(mode, model, ddp, rank, world, wrapped=True)


def _no_buffer_sync(ddp_class) -> dict:
    """Buffers (rotary tables) are the same on every rank: no per-forward broadcast. torch 2.13
    renamed the argument (``forward_sync_buffers``); older releases only know ``broadcast_buffers``."""
    import inspect
    params = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _shard(model, runner, device, param_dtype, rank, world) -> Parallel:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        # Every layer reshards after forward (also the last, whose gathered parameters would be
        # what named_parameters() shows after an eval pass, breaking name-keyed state dicts).
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    _move_unsharded(model, layers, device)
    return Parallel(DataParallel.sharded, model, runner, rank, world, wrapped=True,
                    sharded_modules=layers)


def _move_unsharded(model: nn.Module, layers: list[nn.Module], device: torch.device) -> None:
    """Move what FSDP2 did not take (embedding, final norm, head, rotary buffers) to ``device``;
    the sharded layers are already there (fully_shard moved their shards)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if p.device != device:
                p.data = p.data.to(device)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
