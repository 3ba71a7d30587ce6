"""The per-rank training loop Ray Train runs: one process per device, on every worker pod.

``train_worker(payload)`` goes through the pieces a recipe has: ``setup`` (device, data, model,
the newest good checkpoint's adapter, the data-parallel wrapper of ``parallel.py``, optimizer,
the checkpoint's counters/optimizer/RNG), ``train`` (steps of ``step.TrainStep`` over this rank's
share of each global batch, progress, checkpoints when due), ``save`` (eval, then the whole
adapter and name-keyed state, written by rank 0) and ``finish`` (the artifact and manifest).

Batches: every step consumes exactly ``global_batch_size`` samples of the seeded stream, whatever
the world size (data.step_layout / rank_positions), so a run resumed on another number of devices
continues with the same data position and the same schedule.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..contract import CheckpointRef, DataParallel, TrainJobConfig
from ..cpu import detect_cpu_bf16
from . import drain, fastpath
from .checkpoint import CheckpointStore, scratch_dir
from .data import (PreparedData, SampleStream, collate, prepare, rank_positions, read_dataset,
                   step_layout, total_steps)
from .errors import ResourceError, TrainError
from .model import PrecisionChoice, choose_precision, load_model, load_tokenizer, resolved_targets
from .output import write_output
from .parallel import Parallel, process_group, setup_parallel
from .progress import Reporter
from .state import (STATE_FILE, Counters, counters_of, restore_optimizer, restore_rng, rng_state,
                    state_document)
from .step import TrainStep, all_sum
from .storage import materialize_model

__all__ = ["TrainStep", "train_worker", "worker_device", "evaluate"]
log = logging.getLogger(__name__)


def worker_device(acc, local_rank: int) -> torch.device:
    """This rank's device, from the catalog's accelerator fields; no per-vendor branches.

    GPUs go through Ray Train's own assignment (one GPU per rank). For other resources, when the
    runtime narrowed the rank's view to its own device (``visible_devices_env`` lists one id, or no
    more than the pod has) the first visible one is ours; otherwise index by local rank."""
    if acc.torch_device == "cpu" or acc.devices_per_worker == 0:
        return torch.device("cpu")
    if acc.ray_resource == "GPU":
        import ray.train.torch
        return ray.train.torch.get_device()
    visible = os.environ.get(acc.visible_devices_env or "", "")
    ids = [v for v in visible.split(",") if v.strip()]
    if len(ids) == 1:
        return torch.device(acc.torch_device, 0)
    return torch.device(acc.torch_device, local_rank % acc.ranks_per_worker)


def _broadcast(obj, src: int = 0):
    if process_group()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true when any rank says so (one tiny all-reduce): keeps time-based decisions and
    drain requests in step, so every rank runs the same collectives."""
    if process_group()[1] == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _gather(obj) -> list:
    world = process_group()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def evaluate(model, seqs, pad_id: int, micro: int, amp_dtype, device) -> float | None:
    """Mean per-token loss over the validation set, shared out across ranks. Every rank runs the
    same number of batches (the short ones padded with ignored rows), as FSDP2's gathers need."""
    if seqs is None:
        return None
    rank, world = process_group()
    loss = torch.zeros(2, device=device)
    mine = list(range(rank, len(seqs.input_ids), world))
    per_rank = -(-len(seqs.input_ids) // world)
    model.eval()
    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False))
    with torch.no_grad(), amp:
        for i in range(0, per_rank, micro):
            rows = mine[i:i + micro]
            idx, ignore = (rows, None) if rows else ([0], [True])
            batch = {k: v.to(device) for k, v in collate(seqs, idx, pad_id, ignore).items()}
            s, n = fastpath.causal_lm_loss(model, batch)
            loss += torch.stack([s.float(), n.float()])
    model.train()
    loss = all_sum(loss)
    return (loss[0] / loss[1].clamp(min=1)).item()


@dataclass
class Run:
    """Everything one rank's run holds between the pieces."""
    cfg: TrainJobConfig
    rank: int
    world: int
    device: torch.device
    precision: PrecisionChoice
    data: PreparedData
    tokenizer: object
    model_dir: str
    reporter: Optional[Reporter]
    store: CheckpointStore
    model: object = None
    parallel: Optional[Parallel] = None
    optimizer: object = None
    scheduler: object = None
    step_fn: Optional[TrainStep] = None
    counters: Counters = field(default_factory=Counters)
    accum: int = 1
    n_steps: int = 1
    resumed_step: Optional[int] = None
    last_ref: Optional[CheckpointRef] = None
    messages: list = field(default_factory=list)
    t_start: float = 0.0
    t_ckpt: float = 0.0
    drained: bool = False

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        dtype = self.precision.dtype
        return dtype if dtype != torch.float32 else None

    @property
    def sharded(self) -> bool:
        return self.cfg.accelerator.data_parallel is DataParallel.sharded

    def elapsed(self) -> float:
        return self.counters.elapsed_s + time.monotonic() - self.t_start


@dataclass(frozen=True)
class Process:
    """Where this training process sits: its rank, the world size, its device."""
    rank: int
    world: int
    device: torch.device


def ray_process(cfg: TrainJobConfig) -> Process:
    """This Ray Train worker's rank and device."""
    import ray.train
    ctx = ray.train.get_context()
    return Process(ctx.get_world_rank(), ctx.get_world_size(),
                   worker_device(cfg.accelerator, ctx.get_local_rank()))


def _enter(process: Process, seed: int) -> None:
    device = process.device
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "set_device"):
        mod.set_device(device)
    random.seed(seed + process.rank), np.random.seed(seed + process.rank), torch.manual_seed(seed)


def _load_checkpoint(run: Run) -> Optional[tuple[str, dict]]:
    """Rank 0 picks the newest good checkpoint, every rank downloads that one; (dir, state)."""
    local = scratch_dir(f"tuneserve-ckpt-r{run.rank}-")
    chosen = run.store.latest_good(local) if run.rank == 0 else None
    step = _broadcast(chosen.step if chosen else None)
    if step is None:
        shutil.rmtree(local, ignore_errors=True)
        return None
    if run.rank != 0:
        chosen = next(c for c in run.store.committed() if c.step == step)
        if not run.store.fetch(chosen, local):
            raise TrainError(f"checkpoint {chosen.uri} changed while resuming")
    run.resumed_step = step
    run.last_ref = CheckpointRef(uri=chosen.uri, step=chosen.step, time=chosen.time)
    doc = torch.load(os.path.join(local, STATE_FILE), weights_only=False, map_location="cpu")
    return local, doc


def _build_model(run: Run):
    t_cfg, acc = run.cfg.training, run.cfg.accelerator
    # Sharded: loaded on the host, then fully_shard moves each rank's shard to its device, so a
    # base larger than one device never sits whole on one.
    where = torch.device("cpu") if run.sharded else run.device
    model = load_model(run.model_dir, run.cfg.adapter, acc, where,
                       torch.float32 if run.amp_dtype is None else run.precision.dtype,
                       gradient_checkpointing=t_cfg.gradient_checkpointing)
    # Compiled fused layers are what makes the step fast on GPUs (bench/README.md); they read
    # weights outside the layers' forward, which FSDP2's per-layer gathers cannot see: off when
    # sharded, where PEFT's layers are compiled one by one instead (14.1k against 10.6k tokens/s
    # eager for the 8B on one H200, bench/results/train_data_parallel_h200_run2.txt).
    base = t_cfg.base_precision.value if t_cfg.base_precision else None
    return fastpath.optimize_for_training(model, device=run.device.type, compile=run.device.type == "cuda",
                                          fuse_layers=not run.sharded, base_precision=base)


def _build_optimizer(run: Run) -> None:
    from transformers import get_scheduler
    t_cfg = run.cfg.training
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(params, lr=t_cfg.learning_rate, weight_decay=0.0,
                                      fused=run.device.type == "cuda" or None)
    sched_name = {"constant": "constant_with_warmup"}.get(t_cfg.lr_schedule, t_cfg.lr_schedule)
    run.scheduler = get_scheduler(sched_name, run.optimizer,
                                  num_warmup_steps=int(round(t_cfg.warmup_ratio * run.n_steps)),
                                  num_training_steps=run.n_steps)


def setup(payload: dict, process: Optional[Process] = None) -> Run:
    """Everything before the first step. ``process``: given by callers outside Ray Train (a
    process group already set up); else Ray Train's context."""
    t0 = time.monotonic()
    cfg = TrainJobConfig.model_validate(payload["config"])
    process = process or ray_process(cfg)
    _enter(process, cfg.training.seed)
    rank, world, device = process.rank, process.world, process.device
    t_cfg = cfg.training
    model_dir = materialize_model(cfg.base_model.uri, cfg.base_model.revision)
    tokenizer = load_tokenizer(model_dir)
    run = Run(cfg=cfg, rank=rank, world=world, device=device,
              precision=choose_precision(t_cfg.precision, device.type,
                                         detect_cpu_bf16() if device.type == "cpu" else None),
              data=prepare(read_dataset(cfg.dataset), cfg.dataset, tokenizer,
                           max_len=t_cfg.max_seq_length, pack=t_cfg.packing, seed=t_cfg.seed),
              tokenizer=tokenizer, model_dir=model_dir,
              reporter=Reporter.from_env(cfg.checkpoint.uri) if rank == 0 else None,
              store=CheckpointStore(cfg.checkpoint.uri, cfg.checkpoint.keep))
    run.accum = step_layout(t_cfg.global_batch_size, t_cfg.micro_batch_size, world)
    run.n_steps = total_steps(len(run.data.train.input_ids), t_cfg.global_batch_size, t_cfg.epochs,
                              t_cfg.max_steps)
    run.model = _build_model(run)
    checkpoint = _load_checkpoint(run)
    if checkpoint is not None:     # the adapter goes in before FSDP2 shards it
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        set_peft_model_state_dict(run.model, load_file(
            os.path.join(checkpoint[0], "adapter", "adapter_model.safetensors")))
    run.parallel = setup_parallel(run.model, cfg.accelerator.data_parallel, device,
                                  param_dtype=run.amp_dtype)
    _build_optimizer(run)
    if checkpoint is not None:
        _resume_state(run, checkpoint)
    run.step_fn = _train_step(run)
    _announce(run, time.monotonic() - t0)
    return run


def _resume_state(run: Run, checkpoint: tuple[str, dict]) -> None:
    local, doc = checkpoint
    try:
        restore_optimizer(doc, run.parallel, run.optimizer)
        run.scheduler.load_state_dict(doc["scheduler"])
        restore_rng(doc, run.rank, run.device)
        run.counters = counters_of(doc)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    saved_world = doc.get("world_size")
    note = f"resumed from checkpoint step {run.resumed_step}"
    if saved_world and saved_world != run.world:
        note += f" (saved by {saved_world} ranks, resumed on {run.world})"
    run.messages.append(note)


def _train_step(run: Run) -> TrainStep:
    # CUDA graphs need static shapes (packing gives them) and a dense document mask; where packed
    # rows go through variable-length attention instead, that is faster than a graph could gain
    # (bench/README.md). Replayed dropout RNG is not verified, so runs with LoRA dropout stay
    # eager too; and a wrapped model (DDP, FSDP2) reduces in hooks a graph would not replay.
    t_cfg = run.cfg.training
    graphs = (run.device.type == "cuda" and t_cfg.packing and run.cfg.adapter.dropout == 0
              and fastpath.packed_attention(run.model) != "varlen")
    return TrainStep(run.model, run.optimizer, run.scheduler, grad_accum=run.accum, clip=1.0,
                     amp_dtype=run.amp_dtype, cuda_graphs=graphs, parallel=run.parallel)


def _announce(run: Run, setup_s: float) -> None:
    cfg, t_cfg, c = run.cfg, run.cfg.training, run.counters
    note = run.precision.note
    run.messages = [m for m in [note] + run.messages if m]
    if run.reporter:
        prev = run.reporter.load_previous()
        run.reporter.update(
            force=True, state="Running", step=c.step, total_steps=run.n_steps,
            epoch=c.samples / len(run.data.train.input_ids), tokens_trained=c.tokens_trained,
            loss=c.loss, eval_loss=c.eval_loss, last_checkpoint=run.last_ref,
            resumed_from_step=run.resumed_step if run.resumed_step is not None
            else (prev.resumed_from_step if prev else None),
            precision=run.precision.precision, world_size=run.world,
            data_parallel=cfg.accelerator.data_parallel, message="; ".join(run.messages) or None)
        log.info("precision: %s%s; %s", run.precision.precision.value, f" ({note})" if note else "",
                 fastpath.fastpath_summary(run.model))
    log.info("attempt %d, rank %d/%d on %s (%s): %d train sequences, %d steps of %d samples "
             "(micro %d x accum %d x world %d); set up in %.1fs", cfg.attempt, run.rank, run.world,
             run.device, cfg.accelerator.data_parallel.value, len(run.data.train.input_ids),
             run.n_steps, t_cfg.global_batch_size, t_cfg.micro_batch_size, run.accum, run.world, setup_s)


def _step_batches(run: Run, stream: SampleStream) -> list[dict]:
    t_cfg = run.cfg.training
    positions = rank_positions(run.counters.samples, t_cfg.global_batch_size, t_cfg.micro_batch_size,
                               run.accum, run.rank, run.world)
    batches = []
    for slots in positions:
        ignore = [p is None for p in slots]
        idx = [stream[p if p is not None else run.counters.samples] for p in slots]
        batches.append(collate(run.data.train, idx, run.data.info["pad_id"], ignore))
    return batches


def save(run: Run, drained: Optional[str] = None) -> None:
    """Evaluate, then publish the checkpoint of this step (collectives on every rank, the write on
    rank 0). ``drained``: an emergency checkpoint (drain.py), marked so in its meta and written
    without the eval, which could outlast the pod's grace period (except the last step's: the
    resumed run's manifest reports its eval loss)."""
    c = run.counters
    if drained is None or c.step >= run.n_steps:
        c.eval_loss = evaluate(run.model, run.data.validation, run.data.info["pad_id"],
                               run.cfg.training.micro_batch_size, run.amp_dtype, run.device)
    rngs = _gather(rng_state(run.device))
    adapter = run.parallel.adapter_state()
    optim = run.parallel.optimizer_state(run.optimizer)
    if run.rank == 0:
        run.reporter.update(force=True, state="Checkpointing", eval_loss=c.eval_loss)
        src = scratch_dir("tuneserve-save-")
        try:
            run.model.save_pretrained(os.path.join(src, "adapter"), state_dict=adapter)
            doc = state_document(Counters(c.step, c.samples, c.tokens_trained, run.elapsed(), c.loss,
                                          c.eval_loss), optim, run.scheduler.state_dict(), rngs,
                                 run.world, run.cfg.accelerator.data_parallel.value, run.n_steps)
            torch.save(doc, os.path.join(src, STATE_FILE))
            meta = {"loss": c.loss, "eval_loss": c.eval_loss, **({"drained": drained} if drained else {})}
            saved = run.store.save(c.step, src, meta=meta)
        finally:
            shutil.rmtree(src, ignore_errors=True)
        run.last_ref = CheckpointRef(uri=saved.uri, step=saved.step, time=saved.time)
        run.reporter.update(force=True, state="Running", last_checkpoint=run.last_ref)
    if run.world > 1:
        dist.barrier()
    run.t_ckpt = time.monotonic()


def _report_step(run: Run, window: list, now: float) -> None:
    c = run.counters
    tps = ((window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
           if len(window) > 1 and window[-1][0] > window[0][0] else None)
    rate = (now - run.t_start) / max(1, c.step - (run.resumed_step or 0))
    run.reporter.update(step=c.step, loss=c.loss, tokens_trained=c.tokens_trained,
                        epoch=c.samples / len(run.data.train.input_ids), tokens_per_second=tps,
                        eta_seconds=rate * (run.n_steps - c.step))


def train(run: Run) -> None:
    cfg, c = run.cfg, run.counters
    stream = SampleStream(len(run.data.train.input_ids), cfg.training.seed)
    run.t_start = run.t_ckpt = time.monotonic()
    window = []   # (time, global tokens) for tokens/s
    interval_s = cfg.checkpoint.interval_minutes * 60 if cfg.checkpoint.interval_minutes else None
    saved_at = c.step
    try:
        while c.step < run.n_steps:
            m = run.step_fn(_step_batches(run, stream))
            c.step, c.samples = c.step + 1, c.samples + cfg.training.global_batch_size
            c.tokens_trained += m["global_tokens"]
            c.loss = m["loss"]
            now = time.monotonic()
            window = (window + [(now, c.tokens_trained)])[-20:]
            if run.reporter:
                _report_step(run, window, now)
            due = bool(cfg.checkpoint.interval_steps and c.step % cfg.checkpoint.interval_steps == 0)
            late, run.drained = _any_rank([interval_s is not None and now - run.t_ckpt >= interval_s,
                                           drain.requested()], run.device)
            if run.drained:
                return _drain(run, saved_at)
            if (due or late) and c.step < run.n_steps:
                save(run)
                saved_at = c.step
        if c.step != saved_at or run.resumed_step is None:   # always end on a checkpoint
            save(run)
    except torch.OutOfMemoryError as e:
        raise _oom(run, e) from e
    log.info("rank %d: steps %d..%d took %.1fs", run.rank, run.resumed_step or 0, c.step,
             time.monotonic() - run.t_start)


def _drain(run: Run, saved_at: int) -> None:
    """Every rank stops after this step: its checkpoint committed (unless just saved), reported."""
    why = drain.reason() if drain.requested() else "drain requested on another rank"
    if run.counters.step != saved_at:
        save(run, drained=why)
    log.info("rank %d: drained (%s) after step %d", run.rank, why, run.counters.step)
    if run.reporter:
        run.reporter.update(force=True, state="Running", step=run.counters.step,
                            message=f"drained ({why}) at step {run.counters.step}: checkpoint "
                                    f"step {run.last_ref.step if run.last_ref else None} committed; "
                                    "a resumed run continues from it")


def _oom(run: Run, e: Exception) -> ResourceError:
    t_cfg, device = run.cfg.training, run.device
    peak = getattr(torch, device.type).max_memory_allocated(device) if device.type != "cpu" else None
    return ResourceError(
        f"out of memory on {device} at step {run.counters.step} with micro_batch_size="
        f"{t_cfg.micro_batch_size} x max_seq_length={t_cfg.max_seq_length}"
        + (f" (peak {peak / 2**30:.1f} GiB allocated)" if peak else "")
        + "; lower micro_batch_size or max_seq_length, or use method qlora")


def finish(run: Run) -> None:
    """Write the adapter (whole, from every rank's shards) and its manifest; rank 0 reports."""
    c, cfg = run.counters, run.cfg
    adapter = run.parallel.adapter_state()
    if run.rank == 0:
        run.reporter.update(force=True, state="Running", message=f"writing the adapter to {cfg.output_uri}")
        manifest = write_output(
            cfg, run.model, run.tokenizer, run.model_dir, adapter_state=adapter,
            target_modules=resolved_targets(run.model), dataset_digest=run.data.digest,
            final_step=c.step, final_loss=c.loss, final_eval_loss=c.eval_loss,
            tokens_trained=c.tokens_trained, wall_seconds=run.elapsed(),
            merge_dtype=run.precision.dtype if run.amp_dtype else torch.float32)
        run.reporter.update(force=True, state="Succeeded", step=c.step, eta_seconds=0.0,
                            artifact_uri=cfg.output_uri, artifact_digest=manifest.adapter_digest,
                            message="; ".join(run.messages) or None)
    if run.world > 1:
        dist.barrier()


def train_worker(payload: dict) -> None:
    """Ray Train ``train_loop_per_worker``; ``payload = {"config": TrainJobConfig as JSON}``."""
    try:
        run = setup(payload)
        drain.note_rank(run.rank)
        train(run)
        if not run.drained:
            finish(run)
    finally:
        drain.training_ended()
