"""The training step and the per-worker training loop that Ray Train runs on every worker.

``TrainStep`` is the unit the throughput bench drives directly::

    step = TrainStep(model, optimizer, scheduler, grad_accum=4, clip=1.0, amp_dtype=torch.bfloat16)
    metrics = step([micro_batch_1, ..., micro_batch_4])   # or step(micro_batch) when grad_accum=1

Each micro-batch is a dict of tensors (``input_ids``, ``labels`` and ``position_ids`` or
``attention_mask``; see data.collate). One call does grad_accum forward/backward passes through
``fastpath.causal_lm_loss``, then one clipped optimizer step and one scheduler step. The loss is
normalised by the label tokens of the whole global step (all micro-batches, all ranks), so it is a
true per-token mean however tokens are spread. Works with or without torch.distributed: with it,
the adapter gradients are summed over ranks in one flat all-reduce after the last micro-batch (no
DDP wrapper, so ``causal_lm_loss`` may run the model however it likes). Returned metrics (Python
numbers): ``loss`` (global per-token mean), ``tokens`` (input tokens this rank processed, packing padding
included), ``global_tokens``, ``label_tokens`` (global), ``grad_norm``, ``lr``; all read back
with one host sync per step.

``train_worker(payload)`` is the Ray Train loop: build model and data, resume from the newest good
checkpoint, step, checkpoint, report progress (rank 0), evaluate, and write the output.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from ..contract import CheckpointRef, TrainJobConfig
from ..cpu import detect_cpu_bf16
from . import fastpath
from .checkpoint import CheckpointStore, scratch_dir
from .cudagraph import GraphedMicroStep
from .data import SampleStream, collate, prepare, read_dataset, total_steps
from .errors import ResourceError, TrainError
from .model import choose_precision, load_model, load_tokenizer, resolved_targets
from .output import write_output
from .progress import Reporter
from .storage import materialize_model

log = logging.getLogger(__name__)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist()[1] > 1:
        dist.all_reduce(t)
    return t


class TrainStep:
    """One optimizer step over ``grad_accum`` micro-batches (see the module docstring)."""

    def __init__(self, model, optimizer, scheduler, *, grad_accum: int, clip: float | None,
                 amp_dtype: torch.dtype | None = None, loss_fn=None, cuda_graphs: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.clip, self.amp_dtype = grad_accum, clip, amp_dtype
        self.loss_fn = loss_fn or fastpath.causal_lm_loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        # cudagraph.py: replayed forward+backward for static shapes (CUDA, default loss only).
        self.graphs = (GraphedMicroStep(model, self.params, self.device, self._amp)
                       if cuda_graphs and self.device.type == "cuda" and loss_fn is None else None)

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
        counts = _all_sum(torch.stack([local, tokens]).float())
        scale = 1.0 / counts[0].clamp(min=1)
        loss_total = torch.zeros((), device=self.device)
        graphed = self.graphs is not None and self.graphs.prepare(micro[0])
        for mb in micro:
            if graphed and self.graphs.matches(mb):
                loss_total += self.graphs.run(mb, scale)
                continue
            with self._amp():
                loss_sum, _ = self.loss_fn(self.model, mb)
            (loss_sum * scale).backward()
            loss_total += loss_sum.detach().float()
        self._sync_grads()
        if self.clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        # A captured graph adds into the existing .grad tensors: keep them, zeroed.
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
        loss_total = _all_sum(loss_total)
        # One host sync for all metrics.
        loss, n_label, n_global, n_local, gnorm = torch.stack([
            loss_total / counts[0].clamp(min=1), counts[0], counts[1], tokens.float(),
            grad_norm.float()]).tolist()
        return {"loss": loss, "tokens": int(n_local), "global_tokens": int(n_global),
                "label_tokens": int(n_label), "grad_norm": gnorm, "lr": lr}

    def _sync_grads(self) -> None:
        """Sum the (small) adapter gradients over ranks in one flat all-reduce.

        Done by hand rather than through DDP so the loss function may run the model any way it
        likes (fused layers, decoder-only forward) without going through a DDP wrapper."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if _dist()[1] == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        grads = [p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


# --------------------------------------------------------------------------------- worker loop

def worker_device(acc, local_rank: int) -> torch.device:
    """Map the catalog's accelerator fields to a torch device; no per-vendor branches.

    GPUs go through Ray Train's own assignment. For other resources, when the runtime narrowed
    the worker's view to its own devices (``visible_devices_env`` lists exactly
    ``devices_per_worker`` ids) the first visible one is ours; otherwise index by local rank."""
    if acc.torch_device == "cpu" or acc.devices_per_worker == 0:
        return torch.device("cpu")
    if acc.ray_resource == "GPU":
        import ray.train.torch
        return ray.train.torch.get_device()
    visible = os.environ.get(acc.visible_devices_env or "", "")
    ids = [v for v in visible.split(",") if v.strip()]
    if ids and len(ids) <= acc.devices_per_worker:
        return torch.device(acc.torch_device, 0)
    return torch.device(acc.torch_device, local_rank * acc.devices_per_worker)


def _rng_state(device: torch.device) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "get_rng_state"):
        st["device"] = mod.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "device" in st:
        getattr(torch, device.type).set_rng_state(st["device"], device)


def _broadcast(obj, src: int = 0):
    if _dist()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when any rank says so (one tiny all-reduce): keeps time-based decisions in step."""
    if _dist()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather(obj) -> list:
    if _dist()[1] == 1:
        return [obj]
    out = [None] * _dist()[1]
    dist.all_gather_object(out, obj)
    return out


def evaluate(model, seqs, pad_id: int, micro: int, amp_dtype, device) -> float | None:
    """Mean per-token loss over the validation set, shared out across ranks."""
    if seqs is None:
        return None
    rank, world = _dist()
    loss = torch.zeros(2, device=device)
    model.eval()
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.no_grad(), amp:
        mine = list(range(rank, len(seqs.input_ids), world))
        for i in range(0, len(mine), micro):
            batch = {k: v.to(device) for k, v in collate(seqs, mine[i:i + micro], pad_id).items()}
            s, n = fastpath.causal_lm_loss(model, batch)
            loss += torch.stack([s.float(), n.float()])
    model.train()
    loss = _all_sum(loss)
    return (loss[0] / loss[1].clamp(min=1)).item()


def train_worker(payload: dict) -> None:
    """Ray Train ``train_loop_per_worker``; ``payload = {"config": TrainJobConfig as JSON}``."""
    import ray.train

    t0 = time.monotonic()
    cfg = TrainJobConfig.model_validate(payload["config"])
    t_cfg, acc = cfg.training, cfg.accelerator
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    device = worker_device(acc, local_rank)
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "set_device"):
        mod.set_device(device)
    random.seed(t_cfg.seed + rank), np.random.seed(t_cfg.seed + rank), torch.manual_seed(t_cfg.seed)

    reporter = Reporter.from_env(cfg.checkpoint.uri) if rank == 0 else None
    choice = choose_precision(t_cfg.precision, device.type,
                              detect_cpu_bf16() if device.type == "cpu" else None)
    dtype, note = choice.dtype, choice.note
    amp_dtype = dtype if dtype != torch.float32 else None
    model_dir = materialize_model(cfg.base_model.uri, cfg.base_model.revision)
    tokenizer = load_tokenizer(model_dir)
    data = prepare(read_dataset(cfg.dataset), cfg.dataset, tokenizer, max_len=t_cfg.max_seq_length,
                   pack=t_cfg.packing, seed=t_cfg.seed)
    pad_id = data.info["pad_id"]
    model = load_model(model_dir, cfg.adapter, acc, device,
                       torch.float32 if amp_dtype is None else dtype,
                       gradient_checkpointing=t_cfg.gradient_checkpointing)
    # Compiled fused layers are what makes the step fast on GPUs (bench/README.md: 1.7x the plain
    # loop on an H100); compiling on CPU only costs start-up time in tests.
    model = fastpath.optimize_for_training(model, device=device.type, compile=device.type == "cuda")
    if rank == 0:
        log.info("%s", fastpath.fastpath_summary(model))

    micro = t_cfg.micro_batch_size
    accum = max(1, t_cfg.global_batch_size // (micro * world))
    per_step = micro * accum * world
    n_steps = total_steps(len(data.train.input_ids), per_step, t_cfg.epochs, t_cfg.max_steps)
    warmup = int(round(t_cfg.warmup_ratio * n_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t_cfg.learning_rate, weight_decay=0.0,
                                  fused=device.type == "cuda" or None)
    from transformers import get_scheduler
    sched_name = {"constant": "constant_with_warmup"}.get(t_cfg.lr_schedule, t_cfg.lr_schedule)
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=n_steps)

    # Resume: rank 0 picks the newest good checkpoint, everyone loads that one.
    store = CheckpointStore(cfg.checkpoint.uri, cfg.checkpoint.keep)
    local_ckpt = scratch_dir(f"tuneserve-ckpt-r{rank}-")
    chosen = store.latest_good(local_ckpt) if rank == 0 else None
    chosen_step = _broadcast(chosen.step if chosen else None)
    step, samples, tokens_trained, elapsed_prev = 0, 0, 0, 0.0
    last_loss, eval_loss, last_ref = None, None, None
    if chosen_step is not None:
        if rank != 0:
            chosen = next(c for c in store.committed() if c.step == chosen_step)
            if not store.fetch(chosen, local_ckpt):
                raise TrainError(f"checkpoint {chosen.uri} changed while resuming")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        set_peft_model_state_dict(model, load_file(os.path.join(local_ckpt, "adapter",
                                                                "adapter_model.safetensors")))
        st = torch.load(os.path.join(local_ckpt, "state.pt"), weights_only=False, map_location=device)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step, samples, tokens_trained = st["step"], st["samples"], st["tokens_trained"]
        elapsed_prev, last_loss, eval_loss = st["elapsed_s"], st.get("loss"), st.get("eval_loss")
        rngs = st["rng"]
        _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], device)
        last_ref = CheckpointRef(uri=chosen.uri, step=chosen.step, time=chosen.time)
    shutil.rmtree(local_ckpt, ignore_errors=True)

    # CUDA graphs need static shapes (packing gives them) and a dense document mask; where the
    # packed rows go through variable-length attention instead (CUDA with torch's varlen kernel),
    # that is faster than a graph could gain (bench/README.md), so graphs stay off. Replayed
    # dropout RNG is not verified here, so runs with LoRA dropout stay eager too.
    train_step = TrainStep(model, optimizer, scheduler, grad_accum=accum, clip=1.0,
                           amp_dtype=amp_dtype,
                           cuda_graphs=(device.type == "cuda" and t_cfg.packing and cfg.adapter.dropout == 0
                                        and fastpath.packed_attention(model) != "varlen"))

    messages = [m for m in (note, f"resumed from checkpoint step {chosen_step}"
                            if chosen_step is not None else None) if m]
    if reporter:
        prev = reporter.load_previous()
        reporter.update(force=True, state="Running", step=step, total_steps=n_steps,
                        epoch=samples / len(data.train.input_ids), tokens_trained=tokens_trained,
                        loss=last_loss, eval_loss=eval_loss, last_checkpoint=last_ref,
                        resumed_from_step=chosen_step if chosen_step is not None
                        else (prev.resumed_from_step if prev else None),
                        precision=choice.precision, message="; ".join(messages) or None)
        log.info("precision: %s%s", choice.precision.value, f" ({note})" if note else "")
    log.info("attempt %d, rank %d/%d on %s: %d train sequences, %d steps of %d (micro %d x accum %d"
             " x world %d); set up in %.1fs", cfg.attempt, rank, world, device,
             len(data.train.input_ids), n_steps, per_step, micro, accum, world, time.monotonic() - t0)

    stream = SampleStream(len(data.train.input_ids), t_cfg.seed)
    t_start = time.monotonic()
    t_ckpt = t_start
    window = []   # (time, global tokens) for tokens/s
    interval_s = cfg.checkpoint.interval_minutes * 60 if cfg.checkpoint.interval_minutes else None

    def save(at_step: int):
        nonlocal last_ref, eval_loss, t_ckpt
        eval_loss = evaluate(model, data.validation, pad_id, micro, amp_dtype, device)
        rngs = _gather(_rng_state(device))
        if rank == 0:
            reporter.update(force=True, state="Checkpointing", eval_loss=eval_loss)
            src = scratch_dir("tuneserve-save-")
            try:
                model.save_pretrained(os.path.join(src, "adapter"))
                torch.save({"step": at_step, "samples": samples, "tokens_trained": tokens_trained,
                            "elapsed_s": elapsed_prev + time.monotonic() - t_start,
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rng": rngs, "loss": last_loss, "eval_loss": eval_loss,
                            "world_size": world, "total_steps": n_steps},
                           os.path.join(src, "state.pt"))
                c = store.save(at_step, src, meta={"loss": last_loss, "eval_loss": eval_loss})
            finally:
                shutil.rmtree(src, ignore_errors=True)
            last_ref = CheckpointRef(uri=c.uri, step=c.step, time=c.time)
            reporter.update(force=True, state="Running", last_checkpoint=last_ref)
        if world > 1:
            dist.barrier()
        t_ckpt = time.monotonic()

    saved_at = step
    try:
        while step < n_steps:
            batches = []
            for a in range(accum):
                base = samples + (a * world + rank) * micro
                batches.append(collate(data.train, [stream[base + j] for j in range(micro)], pad_id))
            m = train_step(batches)
            step, samples = step + 1, samples + per_step
            tokens_trained += m["global_tokens"]
            last_loss = m["loss"]
            now = time.monotonic()
            window = (window + [(now, tokens_trained)])[-20:]
            tps = ((window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
                   if len(window) > 1 and window[-1][0] > window[0][0] else None)
            if reporter:
                rate = (now - t_start) / max(1, step - (chosen_step or 0))
                reporter.update(step=step, loss=last_loss, tokens_trained=tokens_trained,
                                epoch=samples / len(data.train.input_ids), tokens_per_second=tps,
                                eta_seconds=rate * (n_steps - step))
            due = bool(cfg.checkpoint.interval_steps and step % cfg.checkpoint.interval_steps == 0)
            if interval_s is not None:
                due = _any_rank(due or now - t_ckpt >= interval_s, device)
            if due and step < n_steps:
                save(step)
                saved_at = step
        if step != saved_at or chosen_step is None:   # always end on a checkpoint
            save(step)
    except torch.OutOfMemoryError as e:
        peak = getattr(torch, device.type).max_memory_allocated(device) \
            if device.type != "cpu" else None
        raise ResourceError(
            f"out of memory on {device} at step {step} with micro_batch_size={micro} x "
            f"max_seq_length={t_cfg.max_seq_length}"
            + (f" (peak {peak / 2**30:.1f} GiB allocated)" if peak else "")
            + "; lower micro_batch_size or max_seq_length, or use method qlora") from e

    log.info("rank %d: steps %d..%d took %.1fs", rank, chosen_step or 0, step, time.monotonic() - t_start)
    if rank == 0:
        reporter.update(force=True, state="Running", message="writing the adapter to "
                        f"{cfg.output_uri}")
        manifest = write_output(
            cfg, model, tokenizer, model_dir, target_modules=resolved_targets(model),
            dataset_digest=data.digest, final_step=step, final_loss=last_loss,
            final_eval_loss=eval_loss, tokens_trained=tokens_trained,
            wall_seconds=elapsed_prev + time.monotonic() - t_start,
            merge_dtype=dtype if amp_dtype else torch.float32)
        reporter.update(force=True, state="Succeeded", step=step, eta_seconds=0.0,
                        artifact_uri=cfg.output_uri, artifact_digest=manifest.adapter_digest,
                        message="; ".join(messages) or None)
    if world > 1:
        dist.barrier()
