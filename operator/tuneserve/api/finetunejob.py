"""FineTuneJob (tuneserve.dev/v1alpha1): the typed spec, the single source of truth for the CRD.

``crds/tuneserve.dev_finetunejobs.yaml`` is generated from these models (``python -m
tuneserve.tools.crdgen``); field descriptions become the CRD's, ``Rule``s become CEL validations.
Parse a CR body once with ``FineTuneJob.from_body`` and pass the typed object around.
"""
from __future__ import annotations

from enum import Enum
from typing import ClassVar, Literal, Optional

from pydantic import Field

from tuneserve import API_GROUP, API_VERSION
# The values the worker understands, from the one shared contract (no second copy to drift).
from tuneserve_workers.contract import BasePrecision, DatasetFormat, Method, Precision
from tuneserve.api.common import (
    name_rule,
    CustomResource, ObjectMeta,
    SHORT_MAX, URI_MAX, ApiModel, Rule, uri_rule,
)
from tuneserve.api.sources import _STORAGE_WHAT, _VENDOR_PATTERN, DATASET_URI_PATTERN, STORAGE_URI_PATTERN, BaseModelSource
from tuneserve.api.finetunejob_status import FineTuneJobStatus
from tuneserve.api.workload import AcceleratorSelector, RayPodOptions, vendor_list_rule

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAMES = ("ftj",)
# KubeRay caps RayJob names at 47 characters (RayCluster name = RayJob name + 6); children are
# named "<ftj>-<attempt>[-suffix]", so the FineTuneJob name keeps room for that.
MAX_NAME_LENGTH = 40


class LrSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DatasetSizeHints(ApiModel):
    """Dataset size, for duration and cost estimates of epoch-based training."""
    tokens: Optional[int] = Field(None, ge=1, description="Tokens in the training split.")
    examples: Optional[int] = Field(None, ge=1, description="Examples (records) in the training split; tokens are then estimated as examples x maxSeqLength.")


class DatasetSource(ApiModel):
    """Training data: JSON Lines in one of the supported record formats."""
    uri: str = Field(max_length=URI_MAX, description="hf://org/name[/file], s3://, gs://, pvc://claim/path or a local path.")
    format: DatasetFormat = Field(DatasetFormat.chat, description='Record format: chat ({"messages": [...]}), instruction ({"instruction", "input"?, "response"}) or text ({"text"}).')
    validation_split: float = Field(0.0, ge=0, lt=1, description="Fraction held out for evaluation loss, in [0, 1).")
    size_hints: Optional[DatasetSizeHints] = Field(None, description="Size of the data, for estimates.")

    rules: ClassVar[tuple[Rule, ...]] = (
        uri_rule("uri", DATASET_URI_PATTERN, "hf://org/name[/path], " + _STORAGE_WHAT),
    )


class LoraConfig(ApiModel):
    """LoRA adapter hyperparameters (also used by QLoRA)."""
    rank: int = Field(16, ge=1, le=256, description="Adapter rank r.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling alpha (effective scale alpha/r).")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the adapter input, in [0, 1). Default 0: measured on an H200, dropout 0.05 cost ~10% "
                    "throughput and 8 GiB for an 8B model, and the fastest published recipes use 0.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, max_length=32,
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": SHORT_MAX}, "x-kubernetes-list-type": "set"},
        description='Modules to adapt; "all-linear" (default) means every linear layer except the output head.')


class TrainingConfig(ApiModel):
    """Optimisation settings. Set epochs or maxSteps (maxSteps wins when both are set)."""
    epochs: Optional[float] = Field(None, gt=0, le=1000, description="Passes over the dataset.")
    max_steps: Optional[int] = Field(None, ge=1, le=10_000_000, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    schedule: LrSchedule = Field(LrSchedule.cosine, description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Fraction of steps spent warming up.")
    global_batch_size: int = Field(16, ge=1, le=65536, description="Sequences per optimizer step over all devices (gradient accumulation fills the gap).")
    micro_batch_size: int = Field(1, ge=1, le=1024, description="Sequences per device per forward pass; drives activation memory.")
    max_seq_length: int = Field(2048, ge=128, le=131072, description="Tokens per sequence (longer records are truncated).")
    packing: bool = Field(True, description="Pack short records into full sequences.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Random seed.")
    precision: Precision = Field(Precision.bf16, description="Compute precision; QLoRA needs bf16 or fp16.")
    gradient_checkpointing: Optional[bool] = Field(
        None,
        description="Recompute activations in backward: less memory, ~1/3 more compute. Unset: automatic, decided per "
                    "placement: off when the memory without recompute fits the device's memory less the catalog's "
                    "recomputeMargin (10%), on otherwise; true or false forces it. The decision and why are in "
                    "status.placement.gradientCheckpointing and the Placed condition.")
    base_precision: Optional[BasePrecision] = Field(
        None,
        description="fp8: frozen base weights stored in FP8 (e4m3, per-row scales) and base matmuls in FP8 while LoRA "
                    "stays in training.precision; needs an accelerator whose catalog entry has fp8: true (NVIDIA "
                    "Hopper/Ada, AMD MI300X). Unset: the base is in training.precision.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.epochs) || has(self.maxSteps)",
             message="set training.epochs or training.maxSteps (maxSteps wins when both are set)",
             check=lambda t: t.epochs is not None or t.max_steps is not None),
        Rule(cel="self.globalBatchSize % self.microBatchSize == 0",
             message="training.globalBatchSize must be a multiple of training.microBatchSize",
             check=lambda t: t.global_batch_size % t.micro_batch_size == 0,
             field_path=".globalBatchSize"),
        Rule(cel="!has(self.basePrecision) || !has(self.precision) || self.precision == 'bf16'",
             message="training.basePrecision fp8 keeps LoRA in bf16; set training.precision to bf16",
             check=lambda t: t.base_precision is None or t.precision == Precision.bf16,
             field_path=".basePrecision"),
    )


class AcceleratorChoice(AcceleratorSelector):
    """One acceptable accelerator, as vendor and/or product from the accelerator catalog."""
    devices_per_worker: int = Field(1, ge=1, le=64, description="Accelerator devices each Ray worker pod requests (one node).")
    workers: int = Field(1, ge=1, le=64, description="Ray worker pods (nodes) in the training group.")

    rules: ClassVar[tuple[Rule, ...]] = AcceleratorSelector.rules


class AutoAcceleratorRequest(ApiModel):
    """Let the operator pick: every catalog accelerator that can hold the model, cheapest
    estimated run first."""
    devices: int = Field(1, ge=1, le=512, description="Total devices to train on.")
    min_memory_gib_per_device: Optional[int] = Field(None, alias="minMemoryGiBPerDevice", ge=1, le=4096, description="Skip accelerators with less memory per device.")
    vendors: Optional[list[str]] = Field(
        None, min_length=1, max_length=8,
        json_schema_extra={"items": {"type": "string", "maxLength": SHORT_MAX, "pattern": _VENDOR_PATTERN}, "x-kubernetes-list-type": "set"},
        description="Only these vendors (default: any but cpu).")

    rules: ClassVar[tuple[Rule, ...]] = (vendor_list_rule("vendors", "vendors", "accelerators.auto.vendors"),)


class AcceleratorRequest(ApiModel):
    """Where training may run: an ordered list of choices, or an automatic request."""
    choices: Optional[list[AcceleratorChoice]] = Field(
        None, min_length=1, max_length=8, json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="Acceptable accelerators, most preferred first. The first that fits now wins; otherwise the first that could fit waits for capacity.")
    auto: Optional[AutoAcceleratorRequest] = Field(None, description="Resolve the choices from the catalog.")
    fallback_after_minutes: int = Field(15, ge=1, le=1440, description="Move to the next choice when the chosen one leaves pods unschedulable this long.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.choices) != has(self.auto)",
             message="set exactly one of accelerators.choices (an ordered list) or accelerators.auto",
             check=lambda a: (a.choices is not None) != (a.auto is not None)),
    )


class CheckpointConfig(ApiModel):
    """Periodic checkpoints; a restarted or moved job resumes from the latest."""
    uri: Optional[str] = Field(None, max_length=URI_MAX, description="Checkpoint storage (default: <output.uri>/checkpoints).")
    interval_minutes: Optional[int] = Field(None, ge=1, le=1440, description="Checkpoint at least this often.")
    interval_steps: Optional[int] = Field(None, ge=1, le=10_000_000, description="Checkpoint every this many steps.")
    keep: int = Field(3, ge=1, le=100, description="Checkpoints kept (older ones are deleted).")

    rules: ClassVar[tuple[Rule, ...]] = (
        uri_rule("uri", STORAGE_URI_PATTERN, _STORAGE_WHAT, required=False),
        Rule(cel="has(self.intervalMinutes) || has(self.intervalSteps)",
             message="set checkpoint.intervalMinutes, checkpoint.intervalSteps, or both",
             check=lambda c: c.interval_minutes is not None or c.interval_steps is not None),
    )


class OutputConfig(ApiModel):
    """Where the trained adapter and its manifest are written."""
    uri: str = Field(max_length=URI_MAX, description=_STORAGE_WHAT + ".")
    merge_weights: bool = Field(False, description="Also write base weights merged with the adapter.")

    rules: ClassVar[tuple[Rule, ...]] = (uri_rule("uri", STORAGE_URI_PATTERN, _STORAGE_WHAT),)


# Fields of the spec that may change after creation; everything else is immutable.
MUTABLE_SPEC_FIELDS = frozenset({"suspend"})


def _immutability_rules(fields: list[str]) -> tuple[Rule, ...]:
    """One has()-aware transition rule per field, at the spec level: a rule on the field itself
    would not fire when an optional field is added or removed."""
    return tuple(
        Rule(cel=f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
             message=f"spec.{f} is immutable after creation (only spec.suspend may change); create a new FineTuneJob",
             field_path=f".{f}")
        for f in fields
    )


class FineTuneRequest(ApiModel):
    """What to fine-tune, how, on which accelerators, and where the adapter goes."""
    base_model: BaseModelSource = Field(description="The model to adapt.")
    dataset: DatasetSource = Field(description="Training data.")
    method: Method = Field(Method.lora, description="lora (base weights in training precision) or qlora (4-bit base weights).")
    lora: LoraConfig = Field(default_factory=LoraConfig, json_schema_extra={"default": {}}, description="Adapter hyperparameters.")
    training: TrainingConfig = Field(description="Optimisation settings.")
    accelerators: AcceleratorRequest = Field(description="Acceptable accelerators, in order of preference, or an automatic request.")
    checkpoint: Optional[CheckpointConfig] = Field(None, description="Checkpointing (default: every 10 minutes to <output.uri>/checkpoints, keep 3).")
    output: OutputConfig = Field(description="Where the adapter goes.")

class FineTuneJobSpec(RayPodOptions, FineTuneRequest):
    """Fine-tune an open model with LoRA/QLoRA on the first acceptable accelerator."""
    # The Ray pod options, worded for training (pydantic orders the fields: the request's, the pod
    # options, then these).
    pod_option_descriptions: ClassVar[dict[str, str]] = {
        "image_overrides": "Training image per catalog vendor, e.g. {nvidia: registry/train:cu128}.",
        "env": "Extra plain env vars for the training containers (names starting with TUNESERVE_ are reserved for the operator and rejected).",
    }
    backoff_limit: int = Field(2, ge=0, le=10, description="Restarts of the Ray job (each resumes from the last checkpoint) before the job fails.")
    suspend: bool = Field(False, description="Suspend (delete the Ray cluster, keep checkpoints) or resume; the only mutable field.")

    rules: ClassVar[tuple[Rule, ...]] = RayPodOptions.rules + (
        Rule(cel="self.method != 'qlora' || !has(self.training.precision) || self.training.precision != 'fp32'",
             message="method qlora computes in bf16 or fp16; set training.precision to bf16 or fp16",
             check=lambda s: not (s.method == Method.qlora and s.training.precision == Precision.fp32),
             field_path=".training.precision"),
        Rule(cel="self.method != 'qlora' || !has(self.training.basePrecision)",
             message="training.basePrecision fp8 is for method lora (qlora already stores the base in 4 bits); "
                     "unset one of them",
             check=lambda s: not (s.method == Method.qlora and s.training.base_precision is not None),
             field_path=".training.basePrecision"),
    )

    def effective_checkpoint(self) -> CheckpointConfig:
        """Checkpoint settings with defaults filled in (the uri under the output)."""
        ckpt = self.checkpoint or CheckpointConfig(interval_minutes=10)
        if ckpt.uri is None:
            ckpt = ckpt.model_copy(update={"uri": self.output.uri.rstrip("/") + "/checkpoints"})
        return ckpt


# Appended after class creation: they need the aliases of every spec field.
FineTuneJobSpec.rules = FineTuneJobSpec.rules + _immutability_rules(
    [info.alias for name, info in FineTuneJobSpec.model_fields.items() if info.alias not in MUTABLE_SPEC_FIELDS]
)


class FineTuneJob(CustomResource):
    """A FineTuneJob custom resource, parsed once from the API body."""
    api_version: Literal["tuneserve.dev/v1alpha1"] = Field(f"{API_GROUP}/{API_VERSION}", alias="apiVersion")
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None



NAME_RULE = name_rule(MAX_NAME_LENGTH, "the Ray objects are")
