"""ModelServe (tuneserve.dev/v1alpha1): serve an open model with LoRA adapters through vLLM on Ray
Serve, behind one OpenAI-compatible endpoint.

``crds/tuneserve.dev_modelserves.yaml`` is generated from these models. The base-model source,
the accelerator selector, the pod options and the credentials are the FineTuneJob's types
(``tuneserve.api.sources`` / ``tuneserve.api.workload``). Unlike a FineTuneJob the spec is
mutable: adapters and replicas change often and apply without restarts; base model and engine
changes roll out on a new Ray cluster (KubeRay ``upgradeStrategy: NewCluster``).
"""
from __future__ import annotations

import re
from enum import Enum
from typing import ClassVar, Literal, Optional

from pydantic import Field

from tuneserve import API_GROUP, API_VERSION
from tuneserve.api.common import LABEL_NAME_PATTERN, name_rule, CustomResource, ObjectMeta, SHORT_MAX, URI_MAX, ApiModel, Rule, uri_rule
from tuneserve.api.finetunejob import MAX_NAME_LENGTH as FINETUNEJOB_MAX_NAME_LENGTH
from tuneserve.api.modelserve_status import ModelServeStatus
from tuneserve.api.sources import _STORAGE_WHAT, MODEL_URI_PATTERN, BaseModelSource
from tuneserve.api.workload import AcceleratorSelector, RayPodOptions
from tuneserve_workers.contract import EngineDtype

KIND = "ModelServe"
PLURAL = "modelserves"
SHORT_NAMES = ("ms",)
# The RayService is named after the ModelServe, and KubeRay caps RayService names at 47
# characters (its RayCluster is "<name>-<5 random>", at most 53); "<ms>-openai" stays under 63.
MAX_NAME_LENGTH = 47
MAX_ADAPTERS = 32
# Engine arguments the operator sets itself; extraEngineArgs may not override them.
MANAGED_ENGINE_ARGS = (
    "model", "served-model-name", "tensor-parallel-size", "pipeline-parallel-size", "max-model-len",
    "gpu-memory-utilization", "enable-lora", "max-loras", "max-lora-rank", "quantization", "dtype",
    "device", "lora-modules", "host", "port",
)
_ENGINE_ARG_KEY = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"


class FineTuneJobRef(ApiModel):
    """A FineTuneJob in the ModelServe's namespace; its adapter is served once it Succeeded."""
    name: str = Field(max_length=FINETUNEJOB_MAX_NAME_LENGTH, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", description="FineTuneJob name.")


class AdapterSource(ApiModel):
    """One LoRA adapter, requested as an OpenAI model name. Exactly one of fineTuneJobRef or uri."""
    name: str = Field(min_length=1, max_length=SHORT_MAX, pattern=LABEL_NAME_PATTERN, description="Model name clients request (a DNS-1123 label, e.g. fin-v1).")
    fine_tune_job_ref: Optional[FineTuneJobRef] = Field(None, description="Serve the adapter this FineTuneJob wrote, once it Succeeded on the same base model.")
    uri: Optional[str] = Field(None, max_length=URI_MAX, description="hf://org/name[@revision], " + _STORAGE_WHAT + ": a PEFT adapter directory.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.fineTuneJobRef) != has(self.uri)",
             message="an adapter needs exactly one of fineTuneJobRef or uri",
             check=lambda a: (a.fine_tune_job_ref is None) != (a.uri is None)),
        uri_rule("uri", MODEL_URI_PATTERN, "hf://org/name[@revision], " + _STORAGE_WHAT, required=False),
    )

    def source(self) -> str:
        """Human form of where it comes from: "FineTuneJob fin-v1" or the URI."""
        return f"FineTuneJob {self.fine_tune_job_ref.name}" if self.fine_tune_job_ref else str(self.uri)


class ServeAcceleratorRequest(ApiModel):
    """Where replicas may run: acceptable accelerators, most preferred first. A replica holds
    engine.tensorParallelSize devices of one node."""
    choices: list[AcceleratorSelector] = Field(
        min_length=1, max_length=8, json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="Acceptable accelerators, most preferred first. The first that can hold the model and fits now wins; otherwise the first that could fit waits for capacity.")
    fallback_after_minutes: int = Field(15, ge=1, le=1440, description="Move to the next choice when the chosen one leaves pods unschedulable this long.")


class Quantization(str, Enum):
    """Weight quantizations a ModelServe may ask for. Each is a vLLM ``--quantization`` method
    (``VLLM_QUANTIZATION``). There is no int8: vLLM has no int8 method for dense models (its
    ``int8_per_channel_weight_only`` and ``experts_int8`` quantize MoE experts only), and W8A8
    checkpoints (compressed-tensors) need no flag, vLLM reads their format from config.json."""
    none = "none"
    fp8 = "fp8"
    awq = "awq"
    gptq = "gptq"


# tuneserve quantization -> vLLM --quantization method (vllm QUANTIZATION_METHODS).
# fp8 quantizes a bf16/fp16 checkpoint on load (or loads an fp8 one); awq and gptq need a
# checkpoint quantized that way.
VLLM_QUANTIZATION: dict[Quantization, Optional[str]] = {
    Quantization.none: None,
    Quantization.fp8: "fp8",
    Quantization.awq: "awq",
    Quantization.gptq: "gptq",
}


class EngineConfig(ApiModel):
    """vLLM engine settings. Changing any of them rolls out a new Ray cluster."""
    tensor_parallel_size: Optional[int] = Field(None, ge=1, le=64, description="Devices per replica; default: the fewest (1, 2, 4, 8, ...) that hold the weights and one maxModelLen sequence of KV cache.")
    max_model_len: Optional[int] = Field(None, ge=128, le=1_048_576, description="Context length (prompt + output tokens); default: the model's.")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description="Share of each device's memory vLLM may use, in (0, 1]; default: the accelerator's (catalog servingMemoryUtilization: 0.9 on accelerators, 0.5 on CPU, where it is a share of the pod's memory that Ray's processes also use).")
    max_loras: int = Field(4, ge=1, le=256, description="Adapters usable in one batch (vLLM --max-loras); more adapters stay loaded in host memory.")
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = Field(16, description="Largest adapter rank served (vLLM --max-lora-rank); adapters of a higher rank fail.")
    quantization: Quantization = Field(Quantization.none, description="Weight quantization (vLLM --quantization); the chosen accelerator must support it (catalog servingQuantizations). "
                                                                      "fp8 quantizes on load; awq and gptq need a model quantized that way. A W8A8 (compressed-tensors) "
                                                                      "checkpoint needs none: vLLM reads its format from the checkpoint.")
    dtype: Optional[EngineDtype] = Field(
        None,
        description="Weights and activations dtype (vLLM --dtype). auto: the model's own dtype (bfloat16 for a float32 checkpoint), "
                    "resolved by the serve app from the model's config. Unset: the accelerator's default (catalog servingDtype): auto on "
                    "GPUs and NPUs, float32 on CPU, where vLLM's bf16 kernels differ from one CPU to the next (AMX, AVX512-BF16, AVX2) "
                    "and on AMX CPUs can kill the engine (docs/serving.md). float32 doubles weight and KV-cache memory.")
    extra_engine_args: Optional[dict[str, str]] = Field(
        None, max_length=32,
        json_schema_extra={"additionalProperties": {"type": "string", "maxLength": 256}},
        description="More vLLM engine arguments by CLI name without dashes, e.g. {enable-prefix-caching: \"true\"}.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="!has(self.extraEngineArgs) || self.extraEngineArgs.all(k, !(k in "
                 + "[" + ", ".join(f"'{a}'" for a in MANAGED_ENGINE_ARGS) + "]))",
             message="extraEngineArgs may not set " + ", ".join(MANAGED_ENGINE_ARGS) + " (they have their own fields)",
             check=lambda e: not set(e.extra_engine_args or {}) & set(MANAGED_ENGINE_ARGS),
             field_path=".extraEngineArgs"),
        Rule(cel="!has(self.extraEngineArgs) || self.extraEngineArgs.all(k, k.size() <= 63 && k.matches('" + _ENGINE_ARG_KEY + "'))",
             message="extraEngineArgs keys are vLLM argument names in kebab-case, e.g. enable-prefix-caching",
             check=lambda e: all(len(k) <= 63 and re.match(_ENGINE_ARG_KEY, k) for k in e.extra_engine_args or {}),
             field_path=".extraEngineArgs"),
    )


class Ingress(str, Enum):
    """How requests get from the endpoint Service to a replica."""
    Direct = "Direct"
    Proxy = "Proxy"


class ReplicaConfig(ApiModel):
    """How many serving replicas (each holds tensorParallelSize devices), scaled by Ray Serve on
    ongoing requests. Changing these applies without restarting replicas."""
    min: int = Field(1, ge=0, le=64, description="Fewest replicas (0 scales to zero when idle).")
    max: int = Field(1, ge=1, le=64, description="Most replicas.")
    target_ongoing_requests: float = Field(16, gt=0, le=1024, description="Ray Serve adds replicas when ongoing requests per replica exceed this.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="!has(self.min) || !has(self.max) || self.min <= self.max", message="replicas.min must not exceed replicas.max",
             check=lambda r: r.min <= r.max),
    )


class ModelServeSpec(RayPodOptions):
    """Serve a base model and LoRA adapters on the first acceptable accelerator."""
    base_model: BaseModelSource = Field(description="The model to serve (the adapters' base).")
    served_model_name: Optional[str] = Field(None, min_length=1, max_length=128, pattern=r"^[-_./A-Za-z0-9]+$", description="Model name of the base model for clients; default: the last part of baseModel.uri (e.g. Qwen2.5-7B-Instruct).")
    adapters: list[AdapterSource] = Field(
        default_factory=list, max_length=MAX_ADAPTERS, json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="LoRA adapters to serve; adding or removing one applies within seconds, without restarting replicas.")
    accelerators: ServeAcceleratorRequest = Field(description="Acceptable accelerators, in order of preference.")
    engine: EngineConfig = Field(default_factory=EngineConfig, json_schema_extra={"default": {}}, description="vLLM engine settings.")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig, json_schema_extra={"default": {}}, description="Replica count and autoscaling.")
    ingress: Ingress = Field(
        Ingress.Direct,
        description="How requests reach the replicas. Direct (default): each replica's own HTTP server "
                    "takes the endpoint Service's traffic on port 8000 (Ray Serve direct ingress, "
                    "RAY_SERVE_THROUGHPUT_OPTIMIZED): no proxy hop, and a pod is in the Service only while "
                    "its replica answers. Proxy: Ray Serve's HTTP proxy on every pod forwards to any replica "
                    "(Ray's default; measured 8-11% less throughput than bare vLLM on an H100, Direct 1-2%). "
                    "Changing it rolls out a new Ray cluster.")

    rules: ClassVar[tuple[Rule, ...]] = RayPodOptions.rules + (
        Rule(cel="!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
             message="adapter names must be unique",
             check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
             field_path=".adapters"),
        Rule(cel="!has(self.adapters) || !self.adapters.exists(a, has(self.servedModelName) ? a.name == self.servedModelName"
                 " : self.baseModel.uri.startsWith('hf://') ? self.baseModel.uri.matches('^hf://[^@]*/' + a.name + '(@.*)?$')"
                 " : self.baseModel.uri.matches('/' + a.name + '/*$'))",
             message="adapter names must differ from the served model name (servedModelName, default the last part "
                     "of baseModel.uri): both are model names on /v1/models",
             check=lambda s: s.model_name() not in {a.name for a in s.adapters},
             field_path=".adapters"),
    )

    def model_name(self) -> str:
        """The OpenAI model name of the base model."""
        return self.served_model_name or self.base_model.display_name()


class ModelServe(CustomResource):
    """A ModelServe custom resource, parsed once from the API body."""
    api_version: Literal["tuneserve.dev/v1alpha1"] = Field(f"{API_GROUP}/{API_VERSION}", alias="apiVersion")
    kind: Literal["ModelServe"] = KIND
    metadata: ObjectMeta
    spec: ModelServeSpec
    status: Optional[ModelServeStatus] = None


NAME_RULE = name_rule(MAX_NAME_LENGTH, "the RayService is")
