"""Memory, duration and cost estimates."""
from __future__ import annotations

import pytest

from helpers import llama_spec as llama, load_example, merge_patch
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.sources import BaseModelSource
from tuneserve.core.catalog import load_catalog
from tuneserve.core.sizing.model import (
    GIB, ModelSizeUnknown, embedding_parameters, format_duration, model_shape, parse_parameter_count,
)
from tuneserve.core.sizing.training import (
    MemoryEstimate, MemoryPlan, estimate_memory, estimate_run, memory_choice, memory_shortfall, plan_memory,
    recompute_reason, training_tokens,
)
from tuneserve_workers.contract import DataParallel

CATALOG = load_catalog()


def spec_for(uri: str, **patch):
    body = merge_patch(load_example("finetunejob-qwen-bank.yaml"), {"spec": {"baseModel": {"uri": uri}, **patch}})
    return FineTuneJob.from_body(body).spec


@pytest.mark.parametrize("name,expected", [
    ("Qwen2.5-7B-Instruct", 7e9), ("Qwen2.5-0.5B", 0.5e9), ("Mixtral-8x7B-v0.1", 56e9),
    ("Meta-Llama-3.1-70B-Instruct", 70e9), ("gemma-2-9b-it", 9e9), ("SmolLM2-135M", 135e6),
    ("Qwen3-30B-A3B", 30e9), ("phi-4", None), ("DeepSeek-V3", None),
])
def test_parse_parameter_count(name, expected):
    assert parse_parameter_count(name) == expected


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ModelSizeUnknown, match="sizeHints.parametersBillions"):
        model_shape(BaseModelSource(uri="hf://microsoft/phi-4"))
    shape = model_shape(BaseModelSource(uri="hf://microsoft/phi-4", size_hints={"parametersBillions": 14.7}))
    assert shape.parameters == 14.7e9 and shape.source == "hints"


def test_dimension_hints_alone_give_a_size():
    shape = model_shape(BaseModelSource(uri="/models/custom", size_hints={"layers": 32, "hiddenSize": 4096, "vocabSize": 32000}))
    assert shape.parameters == 12 * 32 * 4096 ** 2 + 2 * 32000 * 4096 and shape.source == "hints"


def test_hints_for_dimensions_are_used():
    shape = model_shape(BaseModelSource(uri="hf://Qwen/Qwen2.5-7B-Instruct", size_hints={"layers": 28, "hiddenSize": 3584, "vocabSize": 152064}))
    assert (shape.parameters, shape.layers, shape.hidden_size, shape.vocab_size, shape.source) == (7e9, 28, 3584, 152064, "name+hints")


def test_72b_does_not_fit_l4_and_says_why():
    spec = spec_for("hf://Qwen/Qwen2.5-72B-Instruct")
    shape = model_shape(spec.base_model)
    l4 = CATALOG.get("nvidia/l4")
    msg = memory_shortfall(shape, plan_memory(shape, spec, l4, CATALOG, 1, 1), l4, 1)
    assert msg.startswith("Qwen2.5-72B-Instruct needs ")
    assert "GiB per device replicated (weights 134.1 + LoRA states" in msg and msg.endswith("but NVIDIA L4 24GB has 24 GiB")
    assert " or " not in msg  # one device: nothing to shard over
    mi300x = CATALOG.get("amd/mi300x")
    assert memory_shortfall(shape, plan_memory(shape, spec, mi300x, CATALOG, 1, 8), mi300x, 8) is None


# (model, profile, workers, devices per worker) -> chosen mode (None: rejected), recompute (automatic),
# GiB per device of the choice
@pytest.mark.parametrize("size,profile,workers,per_worker,mode,recompute,gib", [
    ("70B", "nvidia/h100-80gb", 1, 8, DataParallel.sharded, True, 31.5),       # 72.3 without > 72 (80 less 10%)
    ("70B", "nvidia/h100-80gb", 2, 8, DataParallel.sharded, False, 63.8),      # 16 shards
    ("70B", "nvidia/l4", 1, 8, None, True, None),
    ("70B", "nvidia/h100-80gb", 1, 1, None, True, None),                     # one device: nothing to shard over
    ("70B", "amd/mi300x", 1, 8, DataParallel.replicated, True, 148.2),        # a copy fits 192 GiB: no gathers
    ("8B", "nvidia/h100-80gb", 1, 1, DataParallel.replicated, False, 29.9),
    ("8B", "nvidia/h100-80gb", 1, 8, DataParallel.replicated, False, 29.9),   # fits: DDP, not FSDP
    ("8B", "nvidia/l4", 1, 4, DataParallel.replicated, True, 20.4),           # recompute before sharding
])
def test_replicated_when_it_fits_else_sharded(size, profile, workers, per_worker, mode, recompute, gib):
    spec = llama(size)
    shape, prof = model_shape(spec.base_model), CATALOG.get(profile)
    plan = plan_memory(shape, spec, prof, CATALOG, workers, per_worker)
    assert plan.gradient_checkpointing is recompute
    if mode is None:
        assert plan.chosen is None and memory_shortfall(shape, plan, prof, per_worker)
        return
    assert plan.data_parallel == mode and memory_shortfall(shape, plan, prof, per_worker) is None
    assert round(plan.chosen.total_gib, 1) == gib


def test_70b_on_8_l4_shows_both_arithmetics():
    spec = llama("70B")
    shape, l4 = model_shape(spec.base_model), CATALOG.get("nvidia/l4")
    msg = memory_shortfall(shape, plan_memory(shape, spec, l4, CATALOG, 1, 8), l4, 8)
    assert msg == ("Llama-3.1-70B needs 146.7 GiB per device replicated (weights 130.4 + LoRA states 3.3 + activations 5.0 "
                   "+ overhead 7.9) or 31.5 GiB per device sharded over 8 devices (decoder weights 126.1 / 8 = 15.8 + "
                   "embedding and head 4.3 + all-gather of 2 layers 3.6 + LoRA states 0.4 + activations 5.0 + overhead 2.5) "
                   "but NVIDIA L4 24GB has 24 GiB")


def test_70b_on_8_h100_says_why_sharded():
    spec = llama("70B")
    shape, h100 = model_shape(spec.base_model), CATALOG.get("nvidia/h100-80gb")
    why = memory_choice(plan_memory(shape, spec, h100, CATALOG, 1, 8))
    assert why.startswith("sharded over 8 devices (FSDP2): needs 31.5 of 80 GiB per device (decoder weights 126.1 / 8")
    assert why.endswith("; replicated would need 146.7 GiB per device; gradient checkpointing on (automatic): "
                        "without it 72.3 GiB > 72.0 GiB (80 GiB less the 10% margin)")
    spec8 = llama("8B")
    why8 = memory_choice(plan_memory(model_shape(spec8.base_model), spec8, h100, CATALOG, 1, 8))
    assert why8 == ("replicated (DDP over 8 ranks): needs 29.9 of 80 GiB per device; gradient checkpointing off "
                    "(automatic): 29.9 GiB fits 72.0 GiB (80 GiB less the 10% margin)")


@pytest.mark.parametrize("method", ["lora", "qlora"])   # qlora: the formula; plan_memory never shards it
def test_sharded_arithmetic_term_by_term(method):
    """Decoder layers and LoRA states / W, embedding + head whole, two layers gathered at full size,
    activations per device unchanged."""
    spec = llama("70B", method=method)
    shape, h100 = model_shape(spec.base_model), CATALOG.get("nvidia/h100-80gb")
    rep = estimate_memory(shape, spec, h100, CATALOG, gradient_checkpointing=True)
    sh = estimate_memory(shape, spec, h100, CATALOG, gradient_checkpointing=True, shards=8)
    embed = embedding_parameters(shape)
    per_param = 0.5 * 1.03 if method == "qlora" else 2   # qlora: the decoder's 4-bit bytes
    embed_bytes = 4 if method == "qlora" else 2           # qlora: peft keeps the embedding and head in fp32
    decoder = (shape.parameters - embed) * per_param / GIB
    assert sh.data_parallel == DataParallel.sharded and sh.shards == 8
    assert sh.weights_gib == pytest.approx(decoder / 8 + embed * embed_bytes / GIB)
    assert rep.weights_gib == pytest.approx(decoder + embed * embed_bytes / GIB)
    assert sh.gather_gib == pytest.approx(2 * decoder / shape.layers)
    assert sh.lora_states_gib == pytest.approx(rep.lora_states_gib / 8)
    assert sh.activations_gib == rep.activations_gib
    assert sh.total_gib < rep.total_gib


# CPU memory is 4 GiB per core pooled over the worker pod, and the worker runs one rank per core:
# the pool holds every rank's share. (model, workers, cores per worker) -> mode, GiB per worker.
@pytest.mark.parametrize("model,workers,cores,mode,gib", [
    ("Qwen2.5-0.5B-Instruct", 1, 1, DataParallel.replicated, 3.0),    # without recompute: 3.0 <= 3.6
    ("Qwen2.5-0.5B-Instruct", 1, 8, DataParallel.replicated, 24.1),   # 8 copies fit 32 GiB, without recompute
    ("Qwen2.5-1.5B-Instruct", 1, 1, None, None),
    ("Qwen2.5-1.5B-Instruct", 1, 4, DataParallel.sharded, 13.1),      # 4 copies (19.2) do not fit 16
    ("Qwen2.5-3B-Instruct", 1, 8, None, None),
    ("Qwen2.5-3B-Instruct", 2, 8, DataParallel.sharded, 31.2),        # 16 shards
])
def test_worker_scoped_memory_holds_all_of_a_workers_ranks(model, workers, cores, mode, gib):
    spec = spec_for(f"hf://Qwen/{model}", training={"microBatchSize": 1, "maxSeqLength": 512, "globalBatchSize": 8})
    shape, cpu = model_shape(spec.base_model), CATALOG.get("cpu/cpu")
    plan = plan_memory(shape, spec, cpu, CATALOG, workers, cores)
    assert plan.available_gib == 4 * cores and plan.ranks_per_pool == cores
    if mode is None:
        assert plan.chosen is None
        return
    assert plan.data_parallel == mode and round(plan.need_gib(plan.chosen), 1) == gib


def test_qlora_shrinks_weights_and_checkpointing_shrinks_activations():
    lora = spec_for("hf://Qwen/Qwen2.5-32B-Instruct")
    qlora = spec_for("hf://Qwen/Qwen2.5-32B-Instruct", method="qlora")
    shape, h100 = model_shape(lora.base_model), CATALOG.get("nvidia/h100-80gb")
    a, b = (estimate_memory(shape, s, h100, CATALOG, gradient_checkpointing=True) for s in (lora, qlora))
    c = estimate_memory(shape, lora, h100, CATALOG, gradient_checkpointing=False)
    # The decoder goes from 2 bytes to 4 bits (+3 % constants), almost 4x smaller; the embedding
    # and head stay unquantised and double to fp32 (peft), so the whole shrinks less than 3x here.
    embed = embedding_parameters(shape)
    decoder_lora, decoder_qlora = a.weights_gib - embed * 2 / GIB, b.weights_gib - embed * 4 / GIB
    assert decoder_qlora == pytest.approx(decoder_lora * 0.5 * 1.03 / 2)
    assert decoder_qlora < decoder_lora / 3.5
    assert b.weights_gib < a.weights_gib / 2.5
    assert c.activations_gib > 3 * a.activations_gib


def test_cpu_memory_is_per_worker():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct", training={"microBatchSize": 1, "maxSeqLength": 512, "globalBatchSize": 8})
    shape, cpu = model_shape(spec.base_model), CATALOG.get("cpu/cpu")
    one = memory_shortfall(shape, plan_memory(shape, spec, cpu, CATALOG, 1, 1), cpu, 1)
    assert one.startswith("Qwen2.5-7B-Instruct needs 16.2 GiB per worker replicated (weights 13.0 + ")
    assert one.endswith("but CPU has 4 GiB per device x 1 = 4 GiB per worker")
    eight = memory_shortfall(shape, plan_memory(shape, spec, cpu, CATALOG, 1, 8), cpu, 8)
    assert eight.startswith("Qwen2.5-7B-Instruct needs 129.4 GiB per worker replicated (8 ranks x 16.2 GiB: weights 13.0 + ")
    assert " or 48.7 GiB per worker sharded over 8 ranks (8 ranks x 6.1 GiB: decoder weights 11.0 / 8 = 1.4 + " in eight
    assert eight.endswith("but CPU has 4 GiB per device x 8 = 32 GiB per worker")


def test_run_estimate_from_dataset_tokens():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct")
    tokens, note = training_tokens(spec)
    assert tokens == int(40_000_000 * 0.98 * 2) and note is None
    shape, h100 = model_shape(spec.base_model), CATALOG.get("nvidia/h100-80gb")
    run = estimate_run(shape, spec, h100, CATALOG, 8, gradient_checkpointing=True)
    assert run.flops_per_token == 6 * 7e9  # gradient checkpointing on
    expected_tps = 8 * 989e12 * 0.35 / (6 * 7e9)
    assert run.tokens_per_second == pytest.approx(expected_tps)
    assert run.duration_seconds == pytest.approx(tokens / expected_tps + 600)
    assert run.cost_usd == pytest.approx(run.duration_seconds / 3600 * 8 * 3.5)


def test_run_estimate_without_dataset_size_explains():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct", dataset={"sizeHints": None})
    run = estimate_run(model_shape(spec.base_model), spec, CATALOG.get("nvidia/l4"), CATALOG, 1, gradient_checkpointing=True)
    assert run.duration_seconds is None and "sizeHints.tokens" in run.note


def test_max_steps_tokens():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct", training={"maxSteps": 100})
    assert training_tokens(spec) == (100 * 64 * 4096, None)


def test_format_duration():
    assert [format_duration(s) for s in (5, 300, 4800, 200000)] == ["5s", "5m", "1h20m", "2d7h"]


def test_qlora_is_never_sharded_and_the_refusal_says_so():
    """A 70B QLoRA (~40 GiB at 4 bits) on 8x L4 24GB: sharding is not considered (the worker's
    4-bit weights cannot be split by FSDP2), the message says so and points at method lora; on one
    H100 80GB it fits replicated."""
    spec = llama("70B", method="qlora")
    shape = model_shape(spec.base_model)
    l4, h100 = CATALOG.get("nvidia/l4"), CATALOG.get("nvidia/h100-80gb")
    plan = plan_memory(shape, spec, l4, CATALOG, 1, 8)
    assert plan.sharded is None and plan.chosen is None
    msg = memory_shortfall(shape, plan, l4, 8)
    assert "replicated" in msg and "sharded over" not in msg
    assert "QLoRA is not sharded: its 4-bit weights cannot be split by FSDP2; use method lora to shard" in msg
    fits = plan_memory(shape, spec, h100, CATALOG, 1, 8)
    assert fits.data_parallel == DataParallel.replicated and fits.chosen is not None


def _literal(total: float, recompute: bool, shards: int = 1) -> MemoryEstimate:
    """An estimate of ``total`` GiB (all of it weights), for decisions on literal numbers."""
    mode = DataParallel.sharded if shards > 1 else DataParallel.replicated
    return MemoryEstimate(total, 0.0, 0.0, 0.0, 0.0, mode, shards, gradient_checkpointing=recompute)


# Options in plan_memory's order (replicated off, on, sharded off, on; a forced setting: only its
# value), 100 GiB per device, 10% margin -> the chosen (mode, recompute), None: nothing fits.
@pytest.mark.parametrize("automatic,options,chosen", [
    (True, [(90.0, False, 1), (60.0, True, 1)], ("replicated", False)),     # at the margin: off
    (True, [(90.1, False, 1), (60.0, True, 1)], ("replicated", True)),      # past the margin: on
    (True, [(95.0, False, 1), (99.0, True, 1), (40.0, False, 8), (20.0, True, 8)], ("replicated", True)),  # recompute before sharding
    (True, [(200.0, False, 1), (150.0, True, 1), (80.0, False, 8), (40.0, True, 8)], ("sharded", False)),
    (True, [(200.0, False, 1), (150.0, True, 1), (95.0, False, 8), (40.0, True, 8)], ("sharded", True)),
    (True, [(200.0, False, 1), (150.0, True, 1), (120.0, False, 8), (101.0, True, 8)], None),
    (False, [(95.0, False, 1)], ("replicated", False)),                     # forced off: the whole device, no margin
    (False, [(30.0, True, 1)], ("replicated", True)),                       # forced on although off would fit
    (False, [(150.0, True, 1), (40.0, True, 8)], ("sharded", True)),
])
def test_automatic_recompute_decision(automatic, options, chosen):
    plan = MemoryPlan(tuple(_literal(*o) for o in options), 100.0, world_size=8,
                      recompute_automatic=automatic, recompute_margin=0.10)
    picked = plan.chosen
    assert (None if picked is None else (picked.data_parallel.value, picked.gradient_checkpointing)) == chosen
    if chosen is not None:
        assert plan.gradient_checkpointing is chosen[1]


# The spec's gradientCheckpointing on the 8B (micro batch 1, 2048 tokens): only that value is
# considered. (setting, profile, devices) -> mode, recompute, the reason (None: refused).
@pytest.mark.parametrize("setting,profile,devices,mode,recompute,reason", [
    (None, "nvidia/h100-80gb", 1, DataParallel.replicated, False,
     "gradient checkpointing off (automatic): 29.9 GiB fits 72.0 GiB (80 GiB less the 10% margin)"),
    (True, "nvidia/h100-80gb", 1, DataParallel.replicated, True, "gradient checkpointing on (set by training.gradientCheckpointing)"),
    (None, "nvidia/l4", 1, DataParallel.replicated, True,
     "gradient checkpointing on (automatic): without it 29.9 GiB > 21.6 GiB (24 GiB less the 10% margin)"),
    (False, "nvidia/l4", 4, DataParallel.sharded, False, "gradient checkpointing off (set by training.gradientCheckpointing)"),
    (False, "nvidia/l4", 1, None, False, None),
])
def test_an_explicit_gradient_checkpointing_is_the_only_one_considered(setting, profile, devices, mode, recompute, reason):
    training = {"maxSteps": 100} if setting is None else {"maxSteps": 100, "gradientCheckpointing": setting}
    spec = llama("8B", training=training)
    shape, prof = model_shape(spec.base_model), CATALOG.get(profile)
    plan = plan_memory(shape, spec, prof, CATALOG, 1, devices)
    assert plan.gradient_checkpointing is recompute
    assert {e.gradient_checkpointing for e in plan.options} == ({False, True} if setting is None else {setting})
    if mode is None:
        assert "training.gradientCheckpointing is false; unset it to recompute when needed" in memory_shortfall(shape, plan, prof, devices)
        return
    assert plan.data_parallel == mode and recompute_reason(plan) == reason
    assert memory_choice(plan).endswith("; " + reason)


def test_fp8_base_weights_need_less_memory_than_bf16():
    """Decoder at 1 byte + per-row fp32 scales, embedding and head at 2 bytes, one FP8 transpose."""
    bf16, fp8 = llama("8B"), llama("8B", training={"maxSteps": 100, "basePrecision": "fp8"})
    shape, h100 = model_shape(bf16.base_model), CATALOG.get("nvidia/h100-80gb")
    a, b = (estimate_memory(shape, s, h100, CATALOG, gradient_checkpointing=False) for s in (bf16, fp8))
    embed = embedding_parameters(shape)
    scales = 4 * shape.layers * (5 + 2 * 3.5) * shape.hidden_size
    assert b.weights_gib == pytest.approx(((shape.parameters - embed) + scales + embed * 2) / GIB)
    assert b.fp8_transpose_gib == pytest.approx(3.5 * shape.hidden_size ** 2 / GIB) and a.fp8_transpose_gib == 0
    assert b.total_gib < a.total_gib and b.activations_gib == a.activations_gib
    assert "FP8 transpose 0.1 + LoRA states" in b.breakdown()
    sharded = estimate_memory(shape, fp8, h100, CATALOG, gradient_checkpointing=True, shards=8)
    assert sharded.gather_gib == pytest.approx(2 * ((shape.parameters - embed) + scales) / shape.layers / GIB)


@pytest.mark.parametrize("recompute,base_precision,flops,speed", [
    (True, None, 6, 1.0), (False, None, 4, 1.0), (False, "fp8", 4, 1.3),
])
def test_run_estimate_uses_the_resolved_recompute_and_the_fp8_factor(recompute, base_precision, flops, speed):
    training = {"maxSteps": 100, **({"basePrecision": base_precision} if base_precision else {})}
    spec = llama("8B", training=training)
    shape, h100 = model_shape(spec.base_model), CATALOG.get("nvidia/h100-80gb")
    run = estimate_run(shape, spec, h100, CATALOG, 1, gradient_checkpointing=recompute)
    assert run.flops_per_token == flops * 8e9
    assert run.tokens_per_second == pytest.approx(989e12 * 0.35 * speed / (flops * 8e9))
