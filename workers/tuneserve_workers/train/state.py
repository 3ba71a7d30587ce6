"""The checkpoint-state format: ``state.pt``, what a checkpoint holds besides the adapter
(counters, optimizer, scheduler, per-rank RNG). checkpoint.py, its sibling, publishes the
directories it lives in (atomic, digested, keep-last-K) and never reads it.

``state.pt`` is independent of the world size and of the data-parallel mode: the optimizer state
is the whole state keyed by parameter name (parallel.Parallel.optimizer_state), the data position
is one integer (samples consumed; data.SampleStream), and the RNG states are per rank, tagged
with their device type. A run resumed on another number of ranks takes rank r's state from
saved rank ``r % saved``; device RNG state is restored only on the same device type (a GPU
checkpoint resumed on CPU or another vendor keeps the host RNGs and says so in the log).
Checkpoints written before the name-keyed format (``optimizer``: torch's index-keyed state) are
still read.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
FORMAT = 2


@dataclass
class Counters:
    """Where a run is; restored on resume."""
    step: int = 0
    samples: int = 0
    tokens_trained: int = 0
    elapsed_s: float = 0.0
    loss: Optional[float] = None
    eval_loss: Optional[float] = None


def rng_state(device: torch.device) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
          "device_type": device.type}
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "get_rng_state"):
        st["device"] = mod.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    saved_on = st.get("device_type", device.type if "device" in st else "cpu")
    if "device" not in st:
        return
    if saved_on != device.type:
        log.info("checkpoint RNG state of %s not restored on %s (host RNGs restored)", saved_on, device)
        return
    getattr(torch, device.type).set_rng_state(st["device"], device)


def state_document(counters: Counters, optimizer_state: dict, scheduler_state: dict, rngs: list,
                   world_size: int, data_parallel: str, total_steps: int) -> dict:
    return {"format": FORMAT, **asdict(counters), "optimizer_by_name": optimizer_state,
            "scheduler": scheduler_state, "rng": rngs, "world_size": world_size,
            "data_parallel": data_parallel, "total_steps": total_steps}


def counters_of(doc: dict) -> Counters:
    return Counters(step=doc["step"], samples=doc["samples"], tokens_trained=doc["tokens_trained"],
                    elapsed_s=doc["elapsed_s"], loss=doc.get("loss"), eval_loss=doc.get("eval_loss"))


def restore_optimizer(doc: dict, parallel, optimizer) -> None:
    if "optimizer_by_name" in doc:
        parallel.load_optimizer_state(optimizer, doc["optimizer_by_name"])
    elif parallel.sharded_modules:
        raise ValueError("this checkpoint's optimizer state is index-keyed (written before "
                         "name-keyed checkpoints) and cannot be loaded into a sharded run")
    else:
        optimizer.load_state_dict(doc["optimizer"])


def restore_rng(doc: dict, rank: int, device: torch.device) -> None:
    rngs = doc["rng"]
    set_rng_state(rngs[rank % len(rngs)], device)
