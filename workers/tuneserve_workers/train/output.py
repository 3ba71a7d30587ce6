"""The job's artifact at ``output_uri``: PEFT adapter files, optional merged weights, manifest.

Layout: ``adapter_config.json`` + ``adapter_model.safetensors`` at the URI root (so vLLM and
``PeftModel.from_pretrained`` take the URI as the adapter path), ``merged/`` when
``merge_weights`` is set, and ``tuneserve-manifest.json`` written last: its presence means the
artifact is complete. The old manifest is removed before anything is overwritten.
Accelerator-hours = training wall hours (summed over resumed attempts, up to their last
checkpoint) x devices, where devices = workers x max(1, devices_per_worker): every device trains
(one process each; a CPU worker without devices counts as one). ``adapter_state`` is the whole
adapter by parameter name (parallel.Parallel.adapter_state), so a sharded model saves as any other.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone

from ..contract import MANIFEST_FILE, AdapterManifest, TrainJobConfig
from .storage import Location, dir_digest


def device_count(cfg: TrainJobConfig) -> int:
    return cfg.accelerator.world_size


def write_output(cfg: TrainJobConfig, peft_model, tokenizer, model_dir: str, *,
                 adapter_state: dict | None = None, target_modules: list[str], dataset_digest: str, final_step: int,
                 final_loss: float | None, final_eval_loss: float | None, tokens_trained: int,
                 wall_seconds: float, merge_dtype) -> AdapterManifest:
    out = Location(cfg.output_uri)
    tmp = tempfile.mkdtemp(prefix="tuneserve-out-")
    try:
        adapter_dir = os.path.join(tmp, "adapter")
        peft_model.save_pretrained(adapter_dir, state_dict=adapter_state)
        digest, _ = dir_digest(adapter_dir)
        out.child(MANIFEST_FILE).rm()
        out.upload_dir(adapter_dir)
        merged_uri = None
        if cfg.merge_weights:
            merged_uri = out.child("merged").uri
            _merge(model_dir, adapter_dir, os.path.join(tmp, "merged"), tokenizer, merge_dtype)
            out.child("merged").rm()
            out.child("merged").upload_dir(os.path.join(tmp, "merged"))
        manifest = AdapterManifest(
            job_name=cfg.job_name, base_model=cfg.base_model, method=cfg.adapter.method,
            rank=cfg.adapter.rank, alpha=cfg.adapter.alpha, target_modules=target_modules,
            dataset_uri=cfg.dataset.uri, dataset_digest=dataset_digest, final_step=final_step,
            final_loss=final_loss, final_eval_loss=final_eval_loss, tokens_trained=tokens_trained,
            accelerator_hours=wall_seconds / 3600 * device_count(cfg), adapter_digest=digest,
            merged_weights_uri=merged_uri, created_at=datetime.now(timezone.utc))
        out.child(MANIFEST_FILE).write_bytes(manifest.model_dump_json(indent=2).encode())
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge(model_dir: str, adapter_dir: str, dst: str, tokenizer, dtype) -> None:
    """Merge into a fresh, unquantised copy of the base (merging into 4-bit weights is lossy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
