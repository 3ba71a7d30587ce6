"""Memory of one vLLM replica (ModelServe), and the tensor-parallel size that holds it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.sizing.model import FFN_RATIO, GIB, ModelShape, lora_parameters

if TYPE_CHECKING:  # the serving estimate takes a ModelServe engine config
    from tuneserve.api.modelserve import EngineConfig

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
