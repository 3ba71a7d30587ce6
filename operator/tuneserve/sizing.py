"""Memory, duration and cost estimates for a LoRA/QLoRA run on one accelerator profile.

Memory per device (data parallel: every device holds a full copy of the base model):

* weights: N x bytes(precision); QLoRA: non-embedding weights at 4 bits (+3 % quantisation
  constants) and the input embedding + output head (2·V·h params, kept unquantised) at 2 bytes.
* LoRA states: P_lora x 16 bytes (fp32 weight 4 + grad 4 + Adam m, v 8), with
  P_lora = layers x rank x hidden x sum over targeted modules of (d_in + d_out) / hidden.
* activations (flash attention, so no seq^2 term; per Korthikanti et al. 2022, a layer keeps
  ~34·b·s·h bytes in 16-bit):
  with gradient checkpointing  b·s·h·(2·L + 34) x (bytes/2)   (layer inputs + one layer recomputed)
  without                      b·s·h·34·L x (bytes/2)
  plus logits in fp32 and their gradient: b·s·V·8 bytes. (b = micro batch, s = max seq length.)
* overhead: the profile's runtime reserve + ``memoryFragmentation`` x the rest.

Throughput: training FLOPs per token are 4N for LoRA (forward 2N + backward through the frozen
weights 2N; frozen weights need no weight gradient, the adapter's share is negligible), 6N with
gradient checkpointing (one more forward). Tokens/s per device = bf16 TFLOP/s x MFU x precision
factor (x QLoRA factor) / FLOPs per token.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tuneserve.api.finetunejob import BaseModelSource, FineTuneJobSpec, Method, Precision
from tuneserve.catalog import AcceleratorProfile, Catalog

if TYPE_CHECKING:  # the serving estimate takes a ModelServe engine config
    from tuneserve.api.modelserve import EngineConfig

GIB = 1024 ** 3
DEFAULT_VOCAB = 128_000
FFN_RATIO = 3.5
LORA_STATE_BYTES = 16
QLORA_BYTES_PER_PARAM = 0.5 * 1.03
PRECISION_BYTES = {Precision.bf16: 2, Precision.fp16: 2, Precision.fp32: 4}

# (d_in + d_out) / hidden of common projection names; unknown names count as a square (2).
MODULE_FACTORS = {
    "q_proj": 2.0, "k_proj": 2.0, "v_proj": 2.0, "o_proj": 2.0,
    "gate_proj": 1 + FFN_RATIO, "up_proj": 1 + FFN_RATIO, "down_proj": 1 + FFN_RATIO,
    "query_key_value": 4.0, "dense": 2.0, "c_attn": 4.0, "c_proj": 2.0, "c_fc": 1 + FFN_RATIO,
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_SIZE_TOKEN = re.compile(r"^(?:(\d+)x)?(\d+(?:\.\d+)?)([bBmM])$")


class ModelSizeUnknown(ValueError):
    """The model's size cannot be derived: no size in the name and no hints."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    parameters: float
    layers: int
    hidden_size: int
    vocab_size: int
    source: str  # "name", "hints", or "name+hints"

    @property
    def billions(self) -> float:
        return self.parameters / 1e9


def parse_parameter_count(name: str) -> Optional[float]:
    """Parameters from a well-known name: "Qwen2.5-7B-Instruct" -> 7e9, "0.5B", "SmolLM-135M",
    "Mixtral-8x7B" -> 56e9 (expert count x size: an upper bound, shared layers counted 8 times)."""
    for token in re.split(r"[-_/ ]", name):
        match = _SIZE_TOKEN.match(token)
        if match:
            experts = int(match.group(1) or 1)
            scale = 1e9 if match.group(3) in "bB" else 1e6
            return experts * float(match.group(2)) * scale
    return None


def _hidden_from_parameters(parameters: float) -> int:
    """Typical decoder aspect ratio L ~ h/128 with N ~ 12·L·h^2 gives h ~ (128·N/12)^(1/3)."""
    return max(128, int(round((128 * parameters / 12) ** (1 / 3) / 128)) * 128)


def model_shape(base_model: BaseModelSource) -> ModelShape:
    """Parameter count: hint, else the name, else 12·L·h^2 + 2·V·h from dimension hints. Missing
    dimensions are derived from the parameter count."""
    name = base_model.display_name()
    hints = base_model.size_hints
    from_name = parse_parameter_count(name)
    parameters = hints.parameters_billions * 1e9 if hints and hints.parameters_billions else None
    vocab = (hints.vocab_size if hints and hints.vocab_size else None) or DEFAULT_VOCAB
    hidden = hints.hidden_size if hints else None
    layers = hints.layers if hints else None
    source = "hints"
    if parameters is None and from_name is not None:
        parameters = from_name
        source = "name+hints" if hints and (hidden or layers or hints.vocab_size) else "name"
    if parameters is None and hidden and layers:
        parameters = 12 * layers * hidden ** 2 + 2 * vocab * hidden
    if parameters is None:
        raise ModelSizeUnknown(
            f"cannot tell the size of {name!r} from its name; set spec.baseModel.sizeHints.parametersBillions "
            "(or layers and hiddenSize)")
    hidden = hidden or _hidden_from_parameters(parameters)
    layers = layers or max(1, round(parameters / (12 * hidden ** 2)))
    return ModelShape(name=name, parameters=parameters, layers=layers, hidden_size=hidden, vocab_size=vocab, source=source)


def lora_parameters(shape: ModelShape, rank: int, target_modules: list[str]) -> float:
    modules = ALL_LINEAR if "all-linear" in target_modules else tuple(target_modules)
    factor = sum(MODULE_FACTORS.get(m, 2.0) for m in modules)
    return shape.layers * rank * shape.hidden_size * factor


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_states_gib: float
    activations_gib: float
    overhead_gib: float
    lora_parameters: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_states_gib + self.activations_gib + self.overhead_gib

    def breakdown(self) -> str:
        return (f"weights {self.weights_gib:.1f} + LoRA states {self.lora_states_gib:.1f} + "
                f"activations {self.activations_gib:.1f} + overhead {self.overhead_gib:.1f}")


def estimate_memory(shape: ModelShape, spec: FineTuneJobSpec, profile: AcceleratorProfile, catalog: Catalog) -> MemoryEstimate:
    """Memory one device (or, for worker-scoped profiles, one worker) needs; formulas above."""
    training = spec.training
    act_bytes = PRECISION_BYTES[training.precision]
    if spec.method == Method.qlora:
        embed = min(2 * shape.vocab_size * shape.hidden_size, 0.3 * shape.parameters)
        weights = (shape.parameters - embed) * QLORA_BYTES_PER_PARAM + embed * 2
    else:
        weights = shape.parameters * PRECISION_BYTES[training.precision]
    p_lora = lora_parameters(shape, spec.lora.rank, spec.lora.target_modules)
    states = p_lora * LORA_STATE_BYTES
    bsh = training.micro_batch_size * training.max_seq_length * shape.hidden_size
    if training.gradient_checkpointing:
        layer_acts = bsh * (2 * shape.layers + 34) * act_bytes / 2
    else:
        layer_acts = bsh * 34 * shape.layers * act_bytes / 2
    logits = training.micro_batch_size * training.max_seq_length * shape.vocab_size * 8
    activations = layer_acts + logits
    base = (weights + states + activations) / GIB
    overhead = profile.runtime_overhead_gib + catalog.defaults.memory_fragmentation * base
    return MemoryEstimate(weights / GIB, states / GIB, activations / GIB, overhead, p_lora)


def memory_shortfall(shape: ModelShape, estimate: MemoryEstimate, profile: AcceleratorProfile,
                     devices_per_worker: int) -> Optional[str]:
    """None when the estimate fits; otherwise the sentence saying why not, with the arithmetic."""
    available = profile.memory_for_model_gib(devices_per_worker)
    if estimate.total_gib <= available:
        return None
    if profile.memory_scope == "worker":
        has = f"{profile.memory_gib:g} GiB per device x {devices_per_worker} = {available:g} GiB per worker"
        per = "per worker"
    else:
        has = f"{available:g} GiB"
        per = "per device"
    return (f"{shape.name} needs {estimate.total_gib:.1f} GiB {per} ({estimate.breakdown()}) "
            f"but {profile.display_name} has {has}")


@dataclass(frozen=True)
class RunEstimate:
    tokens: Optional[int]
    tokens_per_second: float
    duration_seconds: Optional[float]
    cost_usd: Optional[float]
    flops_per_token: float
    note: Optional[str] = None


def training_tokens(spec: FineTuneJobSpec) -> tuple[Optional[int], Optional[str]]:
    """Tokens the run will process: maxSteps x globalBatch x seqLen, else dataset tokens x epochs."""
    t = spec.training
    if t.max_steps is not None:
        return t.max_steps * t.global_batch_size * t.max_seq_length, None
    hints = spec.dataset.size_hints
    if hints and hints.tokens:
        dataset_tokens = hints.tokens
    elif hints and hints.examples:
        dataset_tokens = hints.examples * t.max_seq_length
    else:
        return None, "dataset size unknown: set spec.dataset.sizeHints.tokens (or examples) for a duration and cost estimate"
    return int(dataset_tokens * (1 - spec.dataset.validation_split) * (t.epochs or 1)), None


def estimate_run(shape: ModelShape, spec: FineTuneJobSpec, profile: AcceleratorProfile, catalog: Catalog,
                 devices: int) -> RunEstimate:
    """Duration and cost on ``devices`` devices of ``profile`` (startup time included)."""
    flops_per_token = shape.parameters * (6 if spec.training.gradient_checkpointing else 4)
    speed = catalog.defaults.precision_speed_factor.get(spec.training.precision.value, 1.0)
    if spec.method == Method.qlora:
        speed *= catalog.defaults.qlora_speed_factor
    per_device = profile.bf16_tflops * 1e12 * catalog.mfu(profile) * speed / flops_per_token
    tokens_per_second = per_device * devices
    tokens, note = training_tokens(spec)
    if tokens is None:
        return RunEstimate(None, tokens_per_second, None, None, flops_per_token, note)
    duration = tokens / tokens_per_second + catalog.defaults.startup_minutes * 60
    cost = duration / 3600 * devices * profile.price_per_device_hour
    return RunEstimate(tokens, tokens_per_second, duration, cost, flops_per_token)


def format_duration(seconds: Optional[float]) -> str:
    """'2d3h', '1h20m', '5m', '40s'."""
    if seconds is None:
        return ""
    s = max(0, int(math.ceil(seconds)))
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


# --- Serving (ModelServe) --------------------------------------------------------------------
#
# Memory per device of one vLLM replica with tensor parallelism tp (weights and LoRA slots are
# sharded over the tp devices; the KV cache too):
# e = bytes per element of the engine dtype (float32: 4, else 2; ``engine_element_bytes``).
# * weights: N x bytes(quantization) / tp (none: e, fp8: 1, awq/gptq: 4 bits + 3 %).
# * LoRA slots: vLLM preallocates maxLoras slots of maxLoraRank on every linear layer, in the
#   engine dtype: maxLoras x P_lora(maxLoraRank, all-linear) x e / tp.
# * KV cache for one maxModelLen sequence (vLLM refuses to start without it):
#   2 (K, V) x layers x kv_dim x e x maxModelLen / tp, kv_dim = hidden x KV_HEAD_RATIO
#   (grouped-query attention; the shape hints carry no head counts).
# * activations of one profiling batch: SERVE_BATCH_TOKENS x hidden x (2 + FFN_RATIO) x e / tp.
# * overhead: the profile's runtime reserve + memoryFragmentation x the rest.
# vLLM may use gpuMemoryUtilization x the device's memory; what is left after the above becomes
# more KV cache (reported as tokens of room).
SERVE_WEIGHT_BYTES = {"fp8": 1.0, "awq": 0.5 * 1.03, "gptq": 0.5 * 1.03}   # none: e
KV_HEAD_RATIO = 0.25
SERVE_BATCH_TOKENS = 8192
DEFAULT_SERVE_CONTEXT = 8192
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ServingMemoryEstimate:
    tensor_parallel_size: int
    weights_gib: float
    lora_gib: float
    kv_min_gib: float
    activations_gib: float
    overhead_gib: float
    budget_gib: float              # gpuMemoryUtilization x memory per device
    kv_bytes_per_token: float      # per device
    context_tokens: int
    context_assumed: bool          # maxModelLen unset: DEFAULT_SERVE_CONTEXT assumed

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.kv_min_gib + self.activations_gib + self.overhead_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib

    @property
    def kv_room_tokens(self) -> int:
        """KV cache room per replica after everything else, in tokens."""
        spare = self.budget_gib - (self.total_gib - self.kv_min_gib)
        return max(0, int(spare * GIB / self.kv_bytes_per_token)) if self.kv_bytes_per_token else 0

    def breakdown(self) -> str:
        return (f"weights {self.weights_gib:.1f} + LoRA slots {self.lora_gib:.1f} + KV cache for "
                f"{self.context_tokens} tokens {self.kv_min_gib:.1f} + activations {self.activations_gib:.1f} + "
                f"overhead {self.overhead_gib:.1f}")


def engine_element_bytes(dtype: str) -> float:
    """Bytes per weight/KV element: 4 for float32; 2 for bfloat16, float16 and auto (a float32
    checkpoint is served in bfloat16, a 16-bit one as stored)."""
    return 4.0 if dtype == "float32" else 2.0


def estimate_serving_memory(shape: ModelShape, engine: "EngineConfig", profile: AcceleratorProfile,
                            catalog: Catalog, tensor_parallel_size: int) -> ServingMemoryEstimate:
    """Memory one device of a replica needs (for worker-scoped profiles: the replica's worker)."""
    tp = tensor_parallel_size
    shard = 1 if profile.memory_scope == "worker" else tp
    elem = engine_element_bytes(profile.engine_dtype(engine.dtype))
    weights = shape.parameters * SERVE_WEIGHT_BYTES.get(engine.quantization.value, elem) / shard
    lora = engine.max_loras * lora_parameters(shape, engine.max_lora_rank, ["all-linear"]) * elem / shard
    context = engine.max_model_len or DEFAULT_SERVE_CONTEXT
    kv_per_token = 2 * shape.layers * shape.hidden_size * KV_HEAD_RATIO * elem / shard
    kv_min = kv_per_token * context
    activations = SERVE_BATCH_TOKENS * shape.hidden_size * (2 + FFN_RATIO) * elem / shard
    base = (weights + lora + kv_min + activations) / GIB
    overhead = profile.runtime_overhead_gib + catalog.defaults.memory_fragmentation * base
    budget = profile.memory_for_model_gib(tp) * profile.memory_utilization(engine.gpu_memory_utilization)
    return ServingMemoryEstimate(tp, weights / GIB, lora / GIB, kv_min / GIB, activations / GIB, overhead, budget,
                                 kv_per_token, context, engine.max_model_len is None)


def serving_shortfall(shape: ModelShape, estimate: ServingMemoryEstimate, profile: AcceleratorProfile,
                      gpu_memory_utilization: float) -> Optional[str]:
    """None when a replica fits; otherwise the sentence saying why not, with the arithmetic."""
    if estimate.fits:
        return None
    per = "per worker" if profile.memory_scope == "worker" else "per device"
    assumed = f" (maxModelLen unset: {DEFAULT_SERVE_CONTEXT} assumed)" if estimate.context_assumed else ""
    return (f"{shape.name} with tensorParallelSize {estimate.tensor_parallel_size} needs {estimate.total_gib:.1f} GiB "
            f"{per} ({estimate.breakdown()}){assumed} but {profile.display_name} gives vLLM "
            f"{estimate.budget_gib:.1f} GiB (gpuMemoryUtilization {gpu_memory_utilization:g} of "
            f"{profile.memory_for_model_gib(estimate.tensor_parallel_size):g} GiB)")


def auto_tensor_parallel_size(shape: ModelShape, engine: "EngineConfig", profile: AcceleratorProfile,
                              catalog: Catalog, max_devices: int) -> tuple[Optional[ServingMemoryEstimate], str]:
    """The fewest devices per replica (a power of two, at most ``max_devices``: one node) whose
    estimate fits, or (None, why not even ``max_devices`` suffice)."""
    last: Optional[ServingMemoryEstimate] = None
    for tp in TENSOR_PARALLEL_SIZES:
        if tp > max(1, max_devices):
            break
        last = estimate_serving_memory(shape, engine, profile, catalog, tp)
        if last.fits:
            return last, f"tensorParallelSize {tp} (auto: fewest devices that hold the model)"
    if last is None:
        last = estimate_serving_memory(shape, engine, profile, catalog, 1)
    return None, (serving_shortfall(shape, last, profile, profile.memory_utilization(engine.gpu_memory_utilization)) or "")
