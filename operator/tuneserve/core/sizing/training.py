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

from dataclasses import dataclass
from typing import Optional

from tuneserve.api.finetunejob import FineTuneJobSpec
from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.sizing.model import GIB, ModelShape, embedding_parameters, lora_parameters
from tuneserve_workers.contract import AcceleratorRuntime, DataParallel, Method, Precision

LORA_STATE_BYTES = 16
QLORA_BYTES_PER_PARAM = 0.5 * 1.03
PRECISION_BYTES = {Precision.bf16: 2, Precision.fp16: 2, Precision.fp32: 4}


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
