"""The one typed contract between the operator and the code running inside Ray clusters.

The operator renders these models to JSON (a ConfigMap mounted into the Ray pods, path in
``CONFIG_ENV``); the workers parse them back. Keep this module dependency-light (pydantic only):
the operator imports it, and it must never import the operator.

Progress channel (training -> operator): the training worker writes a ``Progress`` document
 1. as ``progress.json`` beside the checkpoints (durable, survives the cluster), and
 2. into the ConfigMap named by ``PROGRESS_CONFIGMAP_ENV`` under key ``PROGRESS_KEY``, which the
    operator created, owns, and watches; the worker's service account may update only that one
    ConfigMap (RBAC resourceNames). The operator folds it into the FineTuneJob status, so status is
    still written in one place, and no object-store credentials are needed by the operator.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_VERSION = "v1alpha1"
CONFIG_ENV = "TUNESERVE_CONFIG"              # path of the JSON config inside the pod
PROGRESS_CONFIGMAP_ENV = "TUNESERVE_PROGRESS_CONFIGMAP"  # "<namespace>/<name>"
# Env the operator renders for the serve replicas (fallbacks for the ServeAppConfig fields of the
# same meaning). Every TUNESERVE_* variable the operator renders is named here and read by the
# workers through these constants (tests/unit/test_seam.py checks both sides).
ADAPTERS_FILE_ENV = "TUNESERVE_ADAPTERS_FILE"
SERVE_STATUS_CONFIGMAP_ENV = "TUNESERVE_SERVE_STATUS_CONFIGMAP"  # "<namespace>/<name>"
# pvc://<claim>/<path> lives at PVC_ROOT/<claim>/<path>: the operator mounts every claim a job or a
# ModelServe names there, in every Ray pod; TUNESERVE_PVC_ROOT moves the root (tests).
PVC_ROOT = "/mnt/pvc"
PVC_ROOT_ENV = "TUNESERVE_PVC_ROOT"
PROGRESS_KEY = "progress.json"
# The worker's chunked linear cross-entropy computes the logits of this many bytes (bf16) of
# tokens at a time, never all [tokens, vocab] of them; the operator's memory sizing counts one
# chunk (2,048 tokens at a 128k vocabulary).
CE_CHUNK_LOGIT_BYTES = 512 * 1024 * 1024


def ce_chunk_tokens(vocab_size: int, chunk_bytes: int = CE_CHUNK_LOGIT_BYTES) -> int:
    """Tokens per cross-entropy chunk: ``chunk_bytes`` of bf16 logits, in whole GEMM tiles
    (2048 rather than 2093 tokens at a 128k vocabulary)."""
    chunk = chunk_bytes // (2 * vocab_size)
    return chunk // 256 * 256 if chunk >= 256 else max(16, chunk)
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "tuneserve-manifest.json"

# Serving (ModelServe); see the module docstring.
SERVE_IMPORT_PATH = "tuneserve_workers.serve.app:build_app"
SERVE_APP_NAME = "tuneserve"
SERVE_DEPLOYMENT_NAME = "tuneserve"     # the @serve.deployment name the serveConfigV2 overrides
SERVE_PORT = 8000
ADAPTERS_DIR = "/etc/tuneserve/adapters"
ADAPTERS_KEY = "adapters.json"
ADAPTERS_FILE = f"{ADAPTERS_DIR}/{ADAPTERS_KEY}"
SERVE_STATUS_KEY_PREFIX = "replica."
SERVE_HEARTBEAT_SECONDS = 15
SERVE_REPORT_STALE_SECONDS = 60
# A replica that failed writes one last report and stops; the operator keeps showing why this long.
SERVE_FAILURE_REPORT_SECONDS = 900
# vLLM --dtype values the serve app accepts; "auto" is resolved by the app itself from the model.
EngineDtype = Literal["auto", "bfloat16", "float16", "float32"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DatasetFormat(str, Enum):
    chat = "chat"                    # {"messages": [{"role": ..., "content": ...}, ...]}
    instruction = "instruction"      # {"instruction": ..., "input"?: ..., "response": ...}
    text = "text"                    # {"text": ...}


class Method(str, Enum):
    lora = "lora"
    qlora = "qlora"


class Precision(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class BasePrecision(str, Enum):
    """How the frozen base weights are stored and multiplied, when not in ``TrainingSpec.precision``."""
    # e4m3 weights with one fp32 scale per output row; the base GEMMs run in FP8 (activations and
    # input gradients quantized per row on the fly) while LoRA and everything else stay in the
    # training precision. Needs FP8 matmuls (``AcceleratorRuntime.supports_fp8``).
    fp8 = "fp8"


class DataParallel(str, Enum):
    """How the ranks of a job (one per device, on every worker pod) share the model. The operator's
    sizing decides per placement and renders it; the worker does what it says."""
    # Every rank holds the whole frozen base; torch DDP all-reduces the adapter gradients.
    replicated = "replicated"
    # FSDP2 (fully_shard per decoder layer): the frozen base and the adapter are sharded over all
    # ranks and gathered one layer at a time; for models that do not fit one device.
    sharded = "sharded"


class ModelSource(_Model):
    uri: str
    revision: Optional[str] = None


class DatasetSpec(_Model):
    uri: str
    format: DatasetFormat = DatasetFormat.chat
    validation_split: float = 0.0


class AdapterSpec(_Model):
    method: Method = Method.lora
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])


class TrainingSpec(_Model):
    epochs: Optional[float] = 1.0
    max_steps: Optional[int] = None
    learning_rate: float = 2e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    global_batch_size: int = 16
    micro_batch_size: int = 1
    max_seq_length: int = 2048
    packing: bool = True
    seed: int = 42
    precision: Precision = Precision.bf16
    # Resolved by the operator's sizing (automatic unless the spec sets it): the worker does what
    # it says, and the memory it was sized for assumes it.
    gradient_checkpointing: bool = True
    base_precision: Optional[BasePrecision] = None   # None: the base is in ``precision``


class CheckpointSpec(_Model):
    uri: str
    interval_minutes: Optional[float] = 10.0
    interval_steps: Optional[int] = None
    keep: int = 3


class AcceleratorRuntime(_Model):
    """What the worker needs to know about the hardware it was placed on (from the catalog)."""
    vendor: str = "cpu"
    product: str = "cpu"
    devices_per_worker: int = 0
    workers: int = 1
    torch_device: str = "cpu"            # cuda | xpu | npu | hpu | xla | cpu
    distributed_backend: str = "gloo"    # nccl | rccl(nccl API) | hccl | xccl | gloo
    ray_resource: Optional[str] = None   # e.g. "GPU", "NPU", "HPU", "neuron_cores"
    ray_resources_per_worker: int = 0    # units of ray_resource per worker (neuron: 2 per device)
    supports_4bit: bool = False
    supports_fp8: bool = False           # FP8 matmuls (catalog ``fp8``): Hopper, Ada, MI300X
    price_per_device_hour: float = 0.0
    visible_devices_env: Optional[str] = None  # e.g. CUDA_VISIBLE_DEVICES, ASCEND_RT_VISIBLE_DEVICES
    data_parallel: DataParallel = DataParallel.replicated

    @property
    def ranks_per_worker(self) -> int:
        """One training process per device; a CPU worker without devices runs one."""
        return max(1, self.devices_per_worker)

    @property
    def world_size(self) -> int:
        return self.workers * self.ranks_per_worker


class TrainJobConfig(_Model):
    """Everything the training entrypoint needs; rendered by the operator, read by the worker."""
    contract_version: str = CONTRACT_VERSION
    job_name: str
    namespace: str = "default"
    base_model: ModelSource
    dataset: DatasetSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoint: CheckpointSpec
    output_uri: str
    merge_weights: bool = False
    accelerator: AcceleratorRuntime = Field(default_factory=AcceleratorRuntime)
    attempt: int = 1                     # placement attempt; +1 when the operator falls back


class CheckpointRef(_Model):
    uri: str
    step: int
    time: datetime


class Progress(_Model):
    """Written by the training worker; folded into FineTuneJob status by the operator."""
    state: Literal["Starting", "Running", "Checkpointing", "Succeeded", "Failed"] = "Starting"
    step: int = 0
    total_steps: Optional[int] = None
    epoch: float = 0.0
    loss: Optional[float] = None
    eval_loss: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    tokens_trained: int = 0
    last_checkpoint: Optional[CheckpointRef] = None
    resumed_from_step: Optional[int] = None
    artifact_uri: Optional[str] = None
    artifact_digest: Optional[str] = None
    precision: Optional[Precision] = None   # what the worker trains in (fp32 when bf16 has no native CPU path)
    world_size: Optional[int] = None         # training processes (one per device) of the current attempt
    data_parallel: Optional[DataParallel] = None  # what the worker did (the config's decision)
    message: Optional[str] = None
    updated_at: Optional[datetime] = None


class AdapterManifest(_Model):
    """Written beside the adapter at the output URI; ModelServe checks base_model against it."""
    contract_version: str = CONTRACT_VERSION
    job_name: str
    base_model: ModelSource
    method: Method
    rank: int
    alpha: int
    target_modules: list[str]
    dataset_uri: str
    dataset_digest: str
    final_step: int
    final_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    tokens_trained: int
    accelerator_hours: float
    adapter_digest: str
    merged_weights_uri: Optional[str] = None
    created_at: datetime


class ServeAdapter(_Model):
    name: str
    uri: str


class ServeAppConfig(_Model):
    """The serve application's config (Ray Serve app args). The operator leaves ``adapters`` empty
    and renders the desired set into ``adapters_file`` instead, so adapter changes never touch the
    RayService; everything here is part of the engine and rolls out a new cluster when it changes.
    A replica holds all ``tensor_parallel_size`` devices itself (Ray actor resources), so tensor
    parallelism runs inside the replica (vLLM's multiprocessing executor)."""
    contract_version: str = CONTRACT_VERSION
    served_model_name: str
    base_model: ModelSource
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    max_loras: int = 4
    max_lora_rank: int = 16
    quantization: Optional[str] = None
    # The operator renders spec.engine.dtype or the accelerator's catalog default.
    # "auto": the model's own dtype (bfloat16 for a float32 checkpoint), chosen by the serve app.
    dtype: EngineDtype = "auto"
    extra_engine_args: dict[str, str] = Field(default_factory=dict)
    device: str = "cpu"
    adapters: list[ServeAdapter] = Field(default_factory=list)
    # Added for ModelServe; optional so older configs still parse.
    adapters_file: Optional[str] = None       # ADAPTERS_FILE: JSON list of ServeAdapter, live
    adapters_configmap: Optional[str] = None  # "<namespace>/<ms>-adapters" (same content, via the API)
    status_configmap: Optional[str] = None    # "<namespace>/<ms>-serve-status": ServeReplicaReport per key
    model_serve: Optional[str] = None         # "<namespace>/<name>" of the ModelServe, for logs/metrics
    vllm_plugin: Optional[str] = None         # entry-point name of the vLLM platform plugin (catalog), if any
    ray_resource: Optional[str] = None        # e.g. GPU, NPU, HPU, neuron_cores
    ray_resources_per_replica: int = 0        # units of ray_resource each replica actor holds
    replica_num_cpus: int = 1                 # Ray CPUs of each replica actor (CPU: the cores it computes on)


def pvc_claim(uri: str) -> Optional[str]:
    """The claim of a ``pvc://<claim>/<path>`` URI (None for any other URI)."""
    if not uri.startswith("pvc://"):
        return None
    return uri[len("pvc://"):].strip("/").split("/", 1)[0] or None


def replica_actor_options(cfg: ServeAppConfig) -> dict:
    """The replica actor's Ray resources, computed once for both sides: the operator renders them
    into serveConfigV2 ``ray_actor_options`` (which wins in Ray Serve), the serve app passes the
    same to ``.options()``. Ray spells GPUs ``num_gpus``; every other accelerator is a custom
    resource."""
    opts: dict = {"num_cpus": cfg.replica_num_cpus}
    resource, units = cfg.ray_resource, cfg.ray_resources_per_replica
    if resource and units:
        if resource == "GPU":
            opts["num_gpus"] = units
        else:
            opts["resources"] = {resource: units}
    return opts


class ReplicaAdapterReport(_Model):
    """One adapter as one replica sees it."""
    state: Literal["Loading", "Loaded", "Failed"]
    uri: Optional[str] = None                 # the URI it loaded (a changed URI is a new load)
    message: Optional[str] = None


class ServeReplicaReport(_Model):
    """Written by each serve replica into the status ConfigMap under ``replica_report_key``."""
    contract_version: str = CONTRACT_VERSION
    replica_id: str
    # Ready: engine up, probe answered. Failed: its engine could not start or died; ``message``
    # names the cause and the report is the replica's last (kept SERVE_FAILURE_REPORT_SECONDS).
    state: Literal["Starting", "Ready", "Stopping", "Failed"] = "Starting"
    dtype: Optional[str] = None               # the engine's resolved dtype, once it started
    adapters: dict[str, ReplicaAdapterReport] = Field(default_factory=dict)
    adapters_digest: Optional[str] = None     # sha256 of the adapters file it applied
    adapters_error: Optional[str] = None      # the file could not be read/parsed (last good set kept)
    target_replicas: Optional[int] = None     # the deployment's autoscaling target, if the replica knows it
    message: Optional[str] = None
    updated_at: datetime


def replica_report_key(replica_id: str) -> str:
    """ConfigMap key of one replica's report (keys allow [-._a-zA-Z0-9] only)."""
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in replica_id)
    return f"{SERVE_STATUS_KEY_PREFIX}{safe}.json"
