"""Memory, duration and cost estimates for a LoRA/QLoRA run on one accelerator profile.

Every device trains: a job on W = workers x devicesPerWorker devices runs W ranks (one process
per device, ``contract.AcceleratorRuntime.world_size``) and the global batch stays the same. Each
placement is sized two ways, each with and without recompute (docs/sizing.md):

* replicated (DDP): every device holds a full copy of the base model;
* sharded (FSDP2, ``fully_shard`` per decoder layer over all W ranks): the decoder layers and
  the LoRA states are split W ways, the input embedding and output head stay whole on every rank
  (the chunked loss reads the head's weight directly), and two decoder layers are gathered at
  full size at a time (the current one and the prefetched next one).

Gradient checkpointing (recompute) is resolved here too, per placement: unless the spec forces it,
the options are tried in the order replicated without recompute, replicated with, sharded without,
sharded with (no gathers beat no recompute: sharding only when a copy does not fit even with
recompute), and "without" is taken only when it fits the pool's memory less the catalog's
``recomputeMargin`` (the allocator's peaks are not modelled exactly). None fits: the choice is
rejected with both arithmetics (the recompute-on ones when automatic). Worker-scoped profiles
(CPU: memory per core, pooled per worker, one rank per core) must hold all of a worker's ranks in
that one pool: rank x ranks.

Memory per rank (V = vocabulary, h = hidden size, L = layers, N = parameters):

* weights: N x bytes(precision); QLoRA: non-embedding weights at 4 bits (+3 % quantisation
  constants) and the input embedding + output head (E = 2·V·h params, kept unquantised) at 2
  bytes; FP8 base (``training.basePrecision`` fp8): non-embedding weights at 1 byte plus one fp32
  scale per output row of every linear (4 x L x (5 + 2·FFN_RATIO)·h bytes), the embedding and head
  at 2 bytes, plus a transient FP8 transpose of a layer's largest linear (FFN_RATIO·h^2 bytes) in
  backward. Sharded: (N - E) x bytes / W + E x bytes, plus the all-gather buffers of two layers,
  2 x (N - E) / L x bytes (QLoRA: the 4-bit bytes; FP8: the 1-byte ones).
* LoRA states: P_lora x 16 bytes (fp32 weight 4 + grad 4 + Adam m, v 8), with
  P_lora = layers x rank x hidden x sum over targeted modules of (d_in + d_out) / hidden;
  sharded: / W.
* activations (per rank, both modes; flash attention, so no seq^2 term; per Korthikanti et al.
  2022, a layer keeps a = ~34·b·s·h bytes in 16-bit in the worker's fused or compiled layers;
  QLoRA's eager PEFT layers keep a = 52·b·s·h, measured; the formulas below write 34 for a):
  with gradient checkpointing  b·s·h·(2·L + 34) x (bytes/2)   (layer inputs + one layer recomputed)
  without                      b·s·h·34·L x (bytes/2)
  plus the loss: the worker's chunked cross-entropy holds one chunk of c = min(b·s,
  ``contract.ce_chunk_tokens(V)``) tokens' logits (bf16 + fp32) and their gradient, c·V·8 bytes,
  and the hidden states' gradient, b·s·h·2 (never the whole b·s·V logits).
  (b = micro batch, s = max seq length.)
* overhead: the profile's runtime reserve + ``memoryFragmentation`` x the rest.

Throughput: training FLOPs per token are 4N for LoRA (forward 2N + backward through the frozen
weights 2N; frozen weights need no weight gradient, the adapter's share is negligible), 6N with
gradient checkpointing (one more forward), as resolved for the placement. Tokens/s per device = bf16
TFLOP/s x MFU x precision factor (x QLoRA factor, x FP8 factor) / FLOPs per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tuneserve.api.finetunejob import FineTuneJobSpec
from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.sizing.model import FFN_RATIO, GIB, ModelShape, embedding_parameters, lora_parameters
from tuneserve_workers.contract import AcceleratorRuntime, BasePrecision, DataParallel, Method, Precision, ce_chunk_tokens

LORA_STATE_BYTES = 16
# Bytes a decoder layer keeps for backward per token and hidden unit (16-bit): ~34 (Korthikanti
# et al. 2022) in the worker's fused or compiled layers; 52 for QLoRA, whose 4-bit matmuls
# (bitsandbytes) break torch.compile's graphs, so PEFT's layers run eagerly and keep more
# (measured on an H200 for the 8B at batch 2 x 2048: bench/results/train_issue16_h200_run1.txt).
LAYER_ACTIVATION_BYTES = 34
QLORA_LAYER_ACTIVATION_BYTES = 52
QLORA_BYTES_PER_PARAM = 0.5 * 1.03
PRECISION_BYTES = {Precision.bf16: 2, Precision.fp16: 2, Precision.fp32: 4}
FP8_BYTES_PER_PARAM = 1
FP8_SCALE_BYTES = 4   # one fp32 scale per output row
# Output rows of one decoder layer's linears, in hidden sizes: q, k, v, o (k and v at full width,
# an upper bound under grouped-query attention), gate and up (FFN_RATIO each), down.
LAYER_OUTPUT_ROWS_PER_HIDDEN = 5 + 2 * FFN_RATIO


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
    gradient_checkpointing: bool = True
    fp8_transpose_gib: float = 0.0     # FP8 base: the transposed copy of one linear in backward

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.gather_gib + self.fp8_transpose_gib + self.lora_states_gib
                + self.activations_gib + self.overhead_gib)

    def breakdown(self) -> str:
        rest = (f"LoRA states {self.lora_states_gib:.1f} + activations {self.activations_gib:.1f} + "
                f"overhead {self.overhead_gib:.1f}")
        if self.fp8_transpose_gib:
            rest = f"FP8 transpose {self.fp8_transpose_gib:.1f} + {rest}"
        if self.data_parallel == DataParallel.replicated:
            return f"weights {self.weights_gib:.1f} + {rest}"
        share = self.sharded_weights_gib / self.shards
        whole = self.weights_gib - share
        return (f"decoder weights {self.sharded_weights_gib:.1f} / {self.shards} = {share:.1f} + embedding and head "
                f"{whole:.1f} + all-gather of 2 layers {self.gather_gib:.1f} + {rest}")


def _weight_bytes(shape: ModelShape, spec: FineTuneJobSpec) -> tuple[float, float]:
    """(bytes of the decoder layers, bytes of the embedding + head). QLoRA: the decoder at 4 bits
    (+3 % quantisation constants); FP8 base: the decoder at 1 byte + per-row fp32 scales; the
    embedding and head unquantised: 2 bytes with an FP8 base, 4 with QLoRA (peft's
    prepare_model_for_kbit_training keeps every unquantised weight in fp32)."""
    embed = embedding_parameters(shape)
    if spec.method == Method.qlora:
        return (shape.parameters - embed) * QLORA_BYTES_PER_PARAM, embed * 4
    if spec.training.base_precision == BasePrecision.fp8:
        scales = FP8_SCALE_BYTES * shape.layers * LAYER_OUTPUT_ROWS_PER_HIDDEN * shape.hidden_size
        return (shape.parameters - embed) * FP8_BYTES_PER_PARAM + scales, embed * 2
    per = PRECISION_BYTES[spec.training.precision]
    return (shape.parameters - embed) * per, embed * per


def _fp8_transpose_bytes(shape: ModelShape, spec: FineTuneJobSpec) -> float:
    """The input gradient of an FP8 linear multiplies by its weight transposed, which FP8 matmuls
    need laid out anew: one layer's largest linear (an MLP projection, h x FFN_RATIO·h) at a time."""
    if spec.training.base_precision != BasePrecision.fp8:
        return 0.0
    return FFN_RATIO * shape.hidden_size ** 2 * FP8_BYTES_PER_PARAM


def _activation_bytes(shape: ModelShape, spec: FineTuneJobSpec, gradient_checkpointing: bool) -> float:
    training = spec.training
    act_bytes = PRECISION_BYTES[training.precision]
    bsh = training.micro_batch_size * training.max_seq_length * shape.hidden_size
    per_layer = QLORA_LAYER_ACTIVATION_BYTES if spec.method == Method.qlora else LAYER_ACTIVATION_BYTES
    if gradient_checkpointing:
        layer_acts = bsh * (2 * shape.layers + per_layer) * act_bytes / 2
    else:
        layer_acts = bsh * per_layer * shape.layers * act_bytes / 2
    return layer_acts + _loss_bytes(shape, spec)


def _loss_bytes(shape: ModelShape, spec: FineTuneJobSpec) -> float:
    """The chunked cross-entropy's peak: one chunk's logits (bf16, fp32) and their bf16 gradient,
    8 bytes per logit, plus the kept gradient of the hidden states (16-bit)."""
    training = spec.training
    tokens = training.micro_batch_size * training.max_seq_length
    chunk = min(tokens, ce_chunk_tokens(shape.vocab_size))
    return chunk * shape.vocab_size * 8 + tokens * shape.hidden_size * 2


def estimate_memory(shape: ModelShape, spec: FineTuneJobSpec, profile: AcceleratorProfile, catalog: Catalog,
                    *, gradient_checkpointing: bool, shards: int = 1) -> MemoryEstimate:
    """Memory one rank needs (for worker-scoped profiles: one worker); formulas above.
    ``shards`` > 1: sharded (FSDP2) over that many ranks; 1: replicated."""
    decoder, embed = _weight_bytes(shape, spec)
    p_lora = lora_parameters(shape, spec.lora.rank, spec.lora.target_modules)
    states = p_lora * LORA_STATE_BYTES / shards
    gather = 2 * decoder / shape.layers if shards > 1 else 0.0
    weights = decoder / shards + embed
    transpose = _fp8_transpose_bytes(shape, spec)
    activations = _activation_bytes(shape, spec, gradient_checkpointing)
    base = (weights + gather + transpose + states + activations) / GIB
    overhead = profile.runtime_overhead_gib + catalog.defaults.memory_fragmentation * base
    mode = DataParallel.sharded if shards > 1 else DataParallel.replicated
    return MemoryEstimate(weights / GIB, states / GIB, activations / GIB, overhead, p_lora, mode, shards,
                          decoder / GIB if shards > 1 else 0.0, gather / GIB, gradient_checkpointing, transpose / GIB)


@dataclass(frozen=True)
class MemoryPlan:
    """Every arithmetic considered for one placement, in order of preference (replicated before
    sharded, without recompute before with), and the choice: the first that fits (``chosen`` is
    None when none does).

    A memory pool (a device; for worker-scoped profiles the worker pod) holds ``ranks_per_pool``
    ranks, each with its own share: it fits when rank x ranks_per_pool <= the budget, which is
    ``available_gib`` less ``recompute_margin`` for an automatic "without recompute"."""
    options: tuple[MemoryEstimate, ...]
    available_gib: float                # one pool's memory: a device's, or a worker's
    world_size: int = 1                 # ranks: one per device
    ranks_per_pool: int = 1             # 1 per device; a worker-scoped pool holds the worker's ranks
    per: str = "per device"             # "per worker" for worker-scoped profiles
    not_sharded: Optional[str] = None   # why sharding was not considered, when it was not
    recompute_automatic: bool = True    # spec.training.gradientCheckpointing unset
    recompute_margin: float = 0.0

    @property
    def replicated(self) -> MemoryEstimate:
        """The replicated arithmetic that needs least (with recompute, when it was considered)."""
        return [e for e in self.options if e.data_parallel == DataParallel.replicated][-1]

    @property
    def sharded(self) -> Optional[MemoryEstimate]:
        """The sharded arithmetic that needs least; None: one rank, or QLoRA (nothing to shard)."""
        found = [e for e in self.options if e.data_parallel == DataParallel.sharded]
        return found[-1] if found else None

    def need_gib(self, estimate: MemoryEstimate) -> float:
        return estimate.total_gib * self.ranks_per_pool

    def budget_gib(self, estimate: MemoryEstimate) -> float:
        """What ``estimate`` must fit: an automatic "off" keeps the margin free, anything else may
        use the whole pool (recompute cannot save more; a forced setting is the user's call)."""
        if self.recompute_automatic and not estimate.gradient_checkpointing:
            return self.available_gib * (1 - self.recompute_margin)
        return self.available_gib

    @property
    def chosen(self) -> Optional[MemoryEstimate]:
        return next((e for e in self.options if self.need_gib(e) <= self.budget_gib(e)), None)

    @property
    def data_parallel(self) -> DataParallel:
        chosen = self.chosen
        return chosen.data_parallel if chosen else DataParallel.replicated

    @property
    def gradient_checkpointing(self) -> bool:
        """The resolved decision (the least memory's, with recompute, when nothing fits)."""
        chosen = self.chosen
        return chosen.gradient_checkpointing if chosen else self.options[-1].gradient_checkpointing

    def without_recompute(self, estimate: MemoryEstimate) -> Optional[MemoryEstimate]:
        return next((e for e in self.options if e.shards == estimate.shards and not e.gradient_checkpointing), None)

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


def recompute_settings(spec: FineTuneJobSpec) -> tuple[bool, ...]:
    """Gradient checkpointing values to consider, cheapest compute first: the spec's when it sets
    one, else off then on (automatic)."""
    forced = spec.training.gradient_checkpointing
    return (False, True) if forced is None else (forced,)


def _not_sharded(qlora: bool, fp8: bool) -> Optional[str]:
    if qlora:
        return "QLoRA is not sharded: its 4-bit weights cannot be split by FSDP2; use method lora to shard"
    if fp8:
        return ("an FP8 base is not sharded: the worker runs it in its fused layers, which FSDP2 cannot gather; "
                "unset training.basePrecision to shard")
    return None


def plan_memory(shape: ModelShape, spec: FineTuneJobSpec, profile: AcceleratorProfile, catalog: Catalog,
                workers: int, devices_per_worker: int) -> MemoryPlan:
    """Size a placement of ``workers`` x ``devices_per_worker`` every way it may run: one rank per
    device (``contract.AcceleratorRuntime``), sharding spans every rank, recompute as
    ``recompute_settings``. Worker-scoped profiles (memory pooled per worker, devices counted as
    cores) put all of a worker's ranks in its one pool."""
    runtime = AcceleratorRuntime(workers=workers, devices_per_worker=devices_per_worker)
    world = runtime.world_size
    # The worker's 4-bit (bitsandbytes) weights are not FSDP2-shardable: QLoRA runs replicated;
    # its FP8 base lives in the fused layers, which are off when sharded: FP8 runs replicated too.
    qlora = spec.method == Method.qlora
    fp8 = spec.training.base_precision == BasePrecision.fp8
    shard_counts = (1, world) if world > 1 and not (qlora or fp8) else (1,)
    options = tuple(estimate_memory(shape, spec, profile, catalog, gradient_checkpointing=recompute, shards=shards)
                    for shards in shard_counts for recompute in recompute_settings(spec))
    pooled = profile.memory_scope == "worker"
    return MemoryPlan(options, profile.memory_for_model_gib(devices_per_worker), world,
                      runtime.ranks_per_worker if pooled else 1, "per worker" if pooled else "per device",
                      _not_sharded(qlora, fp8) if world > 1 else None,
                      spec.training.gradient_checkpointing is None, catalog.defaults.recompute_margin)


def memory_shortfall(shape: ModelShape, plan: MemoryPlan, profile: AcceleratorProfile,
                     devices_per_worker: int) -> Optional[str]:
    """None when one arithmetic fits; otherwise the sentence saying why not, with both."""
    if plan.chosen is not None:
        return None
    needs = " or ".join(plan.describe(e) for e in (plan.replicated, plan.sharded) if e is not None)
    if plan.not_sharded:
        needs += f" ({plan.not_sharded})"
    if not plan.recompute_automatic and not plan.gradient_checkpointing:
        needs += " (without recompute: training.gradientCheckpointing is false; unset it to recompute when needed)"
    has = f"{plan.available_gib:g} GiB"
    if profile.memory_scope == "worker":
        has = f"{profile.memory_gib:g} GiB per device x {devices_per_worker} = {plan.available_gib:g} GiB per worker"
    return f"{shape.name} needs {needs} but {profile.display_name} has {has}"


def recompute_reason(plan: MemoryPlan) -> str:
    """Why gradient checkpointing is on or off for the chosen arithmetic, for the placement message:
    'gradient checkpointing off (automatic): 35.1 GiB fits 126.9 GiB (141 GiB less the 10% margin)'."""
    chosen = plan.chosen
    assert chosen is not None
    state = "on" if chosen.gradient_checkpointing else "off"
    if not plan.recompute_automatic:
        return f"gradient checkpointing {state} (set by training.gradientCheckpointing)"
    without = plan.without_recompute(chosen)
    assert without is not None
    budget = (f"{plan.budget_gib(without):.1f} GiB ({plan.available_gib:g} GiB less the "
              f"{plan.recompute_margin:.0%} margin)")
    if not chosen.gradient_checkpointing:
        return f"gradient checkpointing off (automatic): {plan.need_gib(chosen):.1f} GiB fits {budget}"
    return f"gradient checkpointing on (automatic): without it {plan.need_gib(without):.1f} GiB > {budget}"


def memory_choice(plan: MemoryPlan) -> str:
    """Why the chosen mode and recompute, for the placement message."""
    chosen = plan.chosen
    assert chosen is not None
    needs = f"needs {plan.need_gib(chosen):.1f} of {plan.available_gib:g} GiB {plan.per}"
    recompute = recompute_reason(plan)
    if chosen.data_parallel == DataParallel.replicated:
        ranks = f"DDP over {plan.world_size} ranks" if plan.world_size > 1 else "one rank"
        if plan.ranks_per_pool > 1:
            needs += f" ({plan.arithmetic(chosen)})"
        return f"replicated ({ranks}): {needs}; {recompute}"
    return (f"{plan.mode(chosen)} (FSDP2): {needs} ({plan.arithmetic(chosen)}); "
            f"replicated would need {plan.need_gib(plan.replicated):.1f} GiB {plan.per}; {recompute}")


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
                 devices: int, gradient_checkpointing: bool) -> RunEstimate:
    """Duration and cost on ``devices`` devices of ``profile`` (startup time included), with
    recompute as the placement resolved it (``MemoryPlan.gradient_checkpointing``)."""
    flops_per_token = shape.parameters * (6 if gradient_checkpointing else 4)
    speed = catalog.defaults.precision_speed_factor.get(spec.training.precision.value, 1.0)
    if spec.method == Method.qlora:
        speed *= catalog.defaults.qlora_speed_factor
    if spec.training.base_precision == BasePrecision.fp8:
        speed *= catalog.defaults.fp8_speed_factor
    per_device = profile.bf16_tflops * 1e12 * catalog.mfu(profile) * speed / flops_per_token
    tokens_per_second = per_device * devices
    tokens, note = training_tokens(spec)
    if tokens is None:
        return RunEstimate(None, tokens_per_second, None, None, flops_per_token, note)
    duration = tokens / tokens_per_second + catalog.defaults.startup_minutes * 60
    cost = duration / 3600 * devices * profile.price_per_device_hour
    return RunEstimate(tokens, tokens_per_second, duration, cost, flops_per_token)
