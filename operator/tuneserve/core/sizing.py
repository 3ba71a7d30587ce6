"""Memory, duration and cost estimates for a LoRA/QLoRA run on one accelerator profile.

Every device trains: a job on W = workers x devicesPerWorker devices runs W ranks (one process
per device, ``contract.AcceleratorRuntime.world_size``) and the global batch stays the same. Each
placement is sized two ways (docs/sizing.md):

* replicated (DDP): every device holds a full copy of the base model;
* sharded (FSDP2, ``fully_shard`` per decoder layer over all W ranks): the decoder layers and
  the LoRA states are split W ways, the input embedding and output head stay whole on every rank
  (the chunked loss reads the head's weight directly), and two decoder layers are gathered at
  full size at a time (the current one and the prefetched next one).

Replicated is chosen when it fits (no gathers: faster), else sharded when it fits, else the choice
is rejected with both arithmetics. Worker-scoped profiles (CPU: memory per core, pooled per
worker, one rank per core) must hold all of a worker's ranks in that one pool: rank x ranks.

Memory per rank (V = vocabulary, h = hidden size, L = layers, N = parameters):

* weights: N x bytes(precision); QLoRA: non-embedding weights at 4 bits (+3 % quantisation
  constants) and the input embedding + output head (E = 2·V·h params, kept unquantised) at 2
  bytes. Sharded: (N - E) x bytes / W + E x bytes, plus the all-gather buffers of two layers,
  2 x (N - E) / L x bytes (QLoRA: the 4-bit bytes).
* LoRA states: P_lora x 16 bytes (fp32 weight 4 + grad 4 + Adam m, v 8), with
  P_lora = layers x rank x hidden x sum over targeted modules of (d_in + d_out) / hidden;
  sharded: / W.
* activations (per rank, both modes; flash attention, so no seq^2 term; per Korthikanti et al.
  2022, a layer keeps ~34·b·s·h bytes in 16-bit):
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

from tuneserve.api.finetunejob import FineTuneJobSpec
from tuneserve.api.sources import BaseModelSource
from tuneserve.catalog import AcceleratorProfile, Catalog
from tuneserve_workers.contract import AcceleratorRuntime, DataParallel, Method, Precision

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


def embedding_parameters(shape: ModelShape) -> float:
    """Input embedding + output head, 2·V·h (untied; capped at 30 % of N for small models with a
    large vocabulary, whose head is tied)."""
    return min(2 * shape.vocab_size * shape.hidden_size, 0.3 * shape.parameters)


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory one rank needs. Sharded: ``weights_gib`` = the decoder layers' share
    (``sharded_weights_gib`` whole / ``shards``) + the embedding and head kept whole."""
    weights_gib: float
    lora_states_gib: float
    activations_gib: float
    overhead_gib: float
    lora_parameters: float
    data_parallel: DataParallel = DataParallel.replicated
    shards: int = 1                    # ranks the decoder layers and LoRA states are sharded over
    sharded_weights_gib: float = 0.0   # sharded: the decoder layers' weights before sharding
    gather_gib: float = 0.0            # sharded: all-gather buffers of two decoder layers

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gather_gib + self.lora_states_gib + self.activations_gib + self.overhead_gib

    def breakdown(self) -> str:
        rest = (f"LoRA states {self.lora_states_gib:.1f} + activations {self.activations_gib:.1f} + "
                f"overhead {self.overhead_gib:.1f}")
        if self.data_parallel == DataParallel.replicated:
            return f"weights {self.weights_gib:.1f} + {rest}"
        share = self.sharded_weights_gib / self.shards
        whole = self.weights_gib - share
        return (f"decoder weights {self.sharded_weights_gib:.1f} / {self.shards} = {share:.1f} + embedding and head "
                f"{whole:.1f} + all-gather of 2 layers {self.gather_gib:.1f} + {rest}")


def _weight_bytes(shape: ModelShape, spec: FineTuneJobSpec) -> tuple[float, float]:
    """(bytes of the decoder layers, bytes of the embedding + head). QLoRA: the decoder at 4 bits
    (+3 % quantisation constants), embedding and head unquantised at 2 bytes."""
    embed = embedding_parameters(shape)
    if spec.method == Method.qlora:
        return (shape.parameters - embed) * QLORA_BYTES_PER_PARAM, embed * 2
    per = PRECISION_BYTES[spec.training.precision]
    return (shape.parameters - embed) * per, embed * per


def _activation_bytes(shape: ModelShape, spec: FineTuneJobSpec) -> float:
    training = spec.training
    act_bytes = PRECISION_BYTES[training.precision]
    bsh = training.micro_batch_size * training.max_seq_length * shape.hidden_size
    if training.gradient_checkpointing:
        layer_acts = bsh * (2 * shape.layers + 34) * act_bytes / 2
    else:
        layer_acts = bsh * 34 * shape.layers * act_bytes / 2
    logits = training.micro_batch_size * training.max_seq_length * shape.vocab_size * 8
    return layer_acts + logits


def estimate_memory(shape: ModelShape, spec: FineTuneJobSpec, profile: AcceleratorProfile, catalog: Catalog,
                    shards: int = 1) -> MemoryEstimate:
    """Memory one rank needs (for worker-scoped profiles: one worker); formulas above.
    ``shards`` > 1: sharded (FSDP2) over that many ranks; 1: replicated."""
    decoder, embed = _weight_bytes(shape, spec)
    p_lora = lora_parameters(shape, spec.lora.rank, spec.lora.target_modules)
    states = p_lora * LORA_STATE_BYTES / shards
    gather = 2 * decoder / shape.layers if shards > 1 else 0.0
    weights = decoder / shards + embed
    activations = _activation_bytes(shape, spec)
    base = (weights + gather + states + activations) / GIB
    overhead = profile.runtime_overhead_gib + catalog.defaults.memory_fragmentation * base
    mode = DataParallel.sharded if shards > 1 else DataParallel.replicated
    return MemoryEstimate(weights / GIB, states / GIB, activations / GIB, overhead, p_lora, mode, shards,
                          decoder / GIB if shards > 1 else 0.0, gather / GIB)


@dataclass(frozen=True)
class MemoryPlan:
    """Both arithmetics for one placement and the choice between them: replicated when it fits
    (no gathers: faster), else sharded when it fits, else neither (``chosen`` is None).

    A memory pool (a device; for worker-scoped profiles the worker pod) holds ``ranks_per_pool``
    ranks, each with its own share: it fits when rank x ranks_per_pool <= available_gib."""
    replicated: MemoryEstimate
    sharded: Optional[MemoryEstimate]   # None: one rank, nothing to shard over
    available_gib: float                # one pool's memory: a device's, or a worker's
    world_size: int = 1                 # ranks: one per device
    ranks_per_pool: int = 1             # 1 per device; a worker-scoped pool holds the worker's ranks
    per: str = "per device"             # "per worker" for worker-scoped profiles
    not_sharded: Optional[str] = None   # why sharding was not considered, when it was not

    def need_gib(self, estimate: MemoryEstimate) -> float:
        return estimate.total_gib * self.ranks_per_pool

    @property
    def chosen(self) -> Optional[MemoryEstimate]:
        for estimate in (self.replicated, self.sharded):
            if estimate is not None and self.need_gib(estimate) <= self.available_gib:
                return estimate
        return None

    @property
    def data_parallel(self) -> DataParallel:
        chosen = self.chosen
        return chosen.data_parallel if chosen else DataParallel.replicated

    def mode(self, estimate: MemoryEstimate) -> str:
        if estimate.data_parallel == DataParallel.replicated:
            return "replicated"
        return f"sharded over {estimate.shards} {'ranks' if self.ranks_per_pool > 1 else 'devices'}"

    def arithmetic(self, estimate: MemoryEstimate) -> str:
        """'weights 130.4 + ...', or for a pool of several ranks '8 ranks x 2.6 GiB: weights ...'."""
        if self.ranks_per_pool == 1:
            return estimate.breakdown()
        return f"{self.ranks_per_pool} ranks x {estimate.total_gib:.1f} GiB: {estimate.breakdown()}"

    def describe(self, estimate: MemoryEstimate) -> str:
        """'147.6 GiB per device replicated (weights ...)', '32.5 GiB per device sharded over 8 devices (...)'."""
        return f"{self.need_gib(estimate):.1f} GiB {self.per} {self.mode(estimate)} ({self.arithmetic(estimate)})"


def plan_memory(shape: ModelShape, spec: FineTuneJobSpec, profile: AcceleratorProfile, catalog: Catalog,
                workers: int, devices_per_worker: int) -> MemoryPlan:
    """Size a placement of ``workers`` x ``devices_per_worker`` both ways: one rank per device
    (``contract.AcceleratorRuntime``), sharding spans every rank. Worker-scoped profiles (memory
    pooled per worker, devices counted as cores) put all of a worker's ranks in its one pool."""
    runtime = AcceleratorRuntime(workers=workers, devices_per_worker=devices_per_worker)
    world = runtime.world_size
    replicated = estimate_memory(shape, spec, profile, catalog)
    # The worker's 4-bit (bitsandbytes) weights are not FSDP2-shardable: QLoRA runs replicated.
    qlora = spec.method == Method.qlora
    sharded = estimate_memory(shape, spec, profile, catalog, shards=world) if world > 1 and not qlora else None
    pooled = profile.memory_scope == "worker"
    return MemoryPlan(replicated, sharded, profile.memory_for_model_gib(devices_per_worker), world,
                      runtime.ranks_per_worker if pooled else 1, "per worker" if pooled else "per device",
                      "QLoRA is not sharded: its 4-bit weights cannot be split by FSDP2" if qlora and world > 1 else None)


def memory_shortfall(shape: ModelShape, plan: MemoryPlan, profile: AcceleratorProfile,
                     devices_per_worker: int) -> Optional[str]:
    """None when one arithmetic fits; otherwise the sentence saying why not, with both."""
    if plan.chosen is not None:
        return None
    needs = " or ".join(plan.describe(e) for e in (plan.replicated, plan.sharded) if e is not None)
    if plan.not_sharded:
        needs += f" ({plan.not_sharded}; use method lora to shard)"
    has = f"{plan.available_gib:g} GiB"
    if profile.memory_scope == "worker":
        has = f"{profile.memory_gib:g} GiB per device x {devices_per_worker} = {plan.available_gib:g} GiB per worker"
    return f"{shape.name} needs {needs} but {profile.display_name} has {has}"


def memory_choice(plan: MemoryPlan) -> str:
    """Why the chosen mode, for the placement message."""
    chosen = plan.chosen
    assert chosen is not None
    needs = f"needs {plan.need_gib(chosen):.1f} of {plan.available_gib:g} GiB {plan.per}"
    if chosen.data_parallel == DataParallel.replicated:
        ranks = f"DDP over {plan.world_size} ranks" if plan.world_size > 1 else "one rank"
        if plan.ranks_per_pool > 1:
            needs += f" ({plan.arithmetic(chosen)})"
        return f"replicated ({ranks}): {needs}"
    return (f"{plan.mode(chosen)} (FSDP2): {needs} ({plan.arithmetic(chosen)}); "
            f"replicated would need {plan.need_gib(plan.replicated):.1f} GiB {plan.per}")


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
