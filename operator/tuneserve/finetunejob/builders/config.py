"""The worker's TrainJobConfig (contract) and the two ConfigMaps around it."""
from __future__ import annotations

import json
from typing import Any

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.common import (
    CONFIG_FILE, config_configmap_name, object_meta, progress_configmap_name,
)
from tuneserve.core.scheduling.fit import Candidate
from tuneserve_workers import contract


def build_train_config(job: FineTuneJob, candidate: Candidate, attempt: int) -> contract.TrainJobConfig:
    """Translate the spec + the placement into the contract the training worker reads."""
    spec = job.spec
    profile = candidate.profile
    checkpoint = spec.effective_checkpoint()
    return contract.TrainJobConfig(
        job_name=job.metadata.name,
        namespace=job.metadata.namespace,
        base_model=contract.ModelSource(uri=spec.base_model.location(), revision=spec.base_model.revision()),
        dataset=contract.DatasetSpec(uri=spec.dataset.uri, format=spec.dataset.format.value,
                                     validation_split=spec.dataset.validation_split),
        adapter=contract.AdapterSpec(method=spec.method.value, rank=spec.lora.rank, alpha=spec.lora.alpha,
                                     dropout=spec.lora.dropout, target_modules=list(spec.lora.target_modules)),
        training=contract.TrainingSpec(
            epochs=spec.training.epochs, max_steps=spec.training.max_steps,
            learning_rate=spec.training.learning_rate, lr_schedule=spec.training.schedule.value,
            warmup_ratio=spec.training.warmup_ratio, global_batch_size=spec.training.global_batch_size,
            micro_batch_size=spec.training.micro_batch_size, max_seq_length=spec.training.max_seq_length,
            packing=spec.training.packing, seed=spec.training.seed, precision=spec.training.precision.value,
            # Resolved by the placement's sizing (status.placement.gradientCheckpointing).
            gradient_checkpointing=candidate.gradient_checkpointing,
            base_precision=spec.training.base_precision,
        ),
        checkpoint=contract.CheckpointSpec(
            uri=checkpoint.uri, interval_minutes=checkpoint.interval_minutes,
            interval_steps=checkpoint.interval_steps, keep=checkpoint.keep),
        output_uri=spec.output.uri,
        merge_weights=spec.output.merge_weights,
        accelerator=contract.AcceleratorRuntime(
            vendor=profile.vendor, product=profile.product,
            devices_per_worker=candidate.devices_per_worker, workers=candidate.workers,
            torch_device=profile.torch_device, distributed_backend=profile.distributed_backend,
            ray_resource=profile.ray_resource,
            ray_resources_per_worker=candidate.devices_per_worker * profile.ray_resources_per_device if profile.ray_resource else 0,
            supports_4bit=profile.supports_4bit,
            supports_fp8=profile.fp8,
            price_per_device_hour=profile.price_per_device_hour,
            visible_devices_env=profile.visible_devices_env,
            # The placement's sizing decision (recorded in status.placement.dataParallel, so a
            # restarted operator renders the same): sharded only when a copy does not fit a device.
            data_parallel=candidate.data_parallel,
        ),
        attempt=attempt,
    )


def render_json(model: contract._Model) -> str:
    """Deterministic JSON: sorted keys, fixed indentation."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, indent=2) + "\n"


def build_config_configmap(job: FineTuneJob, candidate: Candidate, attempt: int) -> dict[str, Any]:
    """The TrainJobConfig mounted into every Ray pod of this attempt."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(job, config_configmap_name(job.metadata.name, attempt), attempt),
        "data": {CONFIG_FILE: render_json(build_train_config(job, candidate, attempt))},
    }


def build_progress_configmap(job: FineTuneJob) -> dict[str, Any]:
    """The progress channel (see contract.py). Rendered without data: the worker owns key
    ``contract.PROGRESS_KEY``; the operator creates this once and only reads it afterwards."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(job, progress_configmap_name(job.metadata.name)),
    }
