"""Memory, duration and cost estimates."""
from __future__ import annotations

import pytest

from helpers import load_example, merge_patch
from tuneserve.api.finetunejob import BaseModelSource, FineTuneJob
from tuneserve.catalog import load_catalog
from tuneserve.sizing import (
    ModelSizeUnknown, estimate_memory, estimate_run, format_duration, memory_shortfall, model_shape,
    parse_parameter_count, training_tokens,
)

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
    est = estimate_memory(shape, spec, l4, CATALOG)
    msg = memory_shortfall(shape, est, l4, 1)
    assert msg.startswith("Qwen2.5-72B-Instruct needs ")
    assert "GiB per device (weights 134.1 + LoRA states" in msg and msg.endswith("but NVIDIA L4 24GB has 24 GiB")
    assert memory_shortfall(shape, estimate_memory(shape, spec, CATALOG.get("amd/mi300x"), CATALOG), CATALOG.get("amd/mi300x"), 8) is None


def test_qlora_shrinks_weights_and_checkpointing_shrinks_activations():
    lora = spec_for("hf://Qwen/Qwen2.5-32B-Instruct")
    qlora = spec_for("hf://Qwen/Qwen2.5-32B-Instruct", method="qlora")
    no_gc = spec_for("hf://Qwen/Qwen2.5-32B-Instruct", training={"gradientCheckpointing": False})
    shape, h100 = model_shape(lora.base_model), CATALOG.get("nvidia/h100-80gb")
    a, b, c = (estimate_memory(shape, s, h100, CATALOG) for s in (lora, qlora, no_gc))
    assert b.weights_gib < a.weights_gib / 3
    assert c.activations_gib > 3 * a.activations_gib


def test_cpu_memory_is_per_worker():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct", training={"microBatchSize": 1, "maxSeqLength": 512, "globalBatchSize": 8})
    shape, cpu = model_shape(spec.base_model), CATALOG.get("cpu/cpu")
    est = estimate_memory(shape, spec, cpu, CATALOG)
    assert memory_shortfall(shape, est, cpu, 1) is not None and "per worker" in memory_shortfall(shape, est, cpu, 1)
    assert memory_shortfall(shape, est, cpu, 8) is None  # 8 cores x 4 GiB


def test_run_estimate_from_dataset_tokens():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct")
    tokens, note = training_tokens(spec)
    assert tokens == int(40_000_000 * 0.98 * 2) and note is None
    shape, h100 = model_shape(spec.base_model), CATALOG.get("nvidia/h100-80gb")
    run = estimate_run(shape, spec, h100, CATALOG, 8)
    assert run.flops_per_token == 6 * 7e9  # gradient checkpointing on
    expected_tps = 8 * 989e12 * 0.35 / (6 * 7e9)
    assert run.tokens_per_second == pytest.approx(expected_tps)
    assert run.duration_seconds == pytest.approx(tokens / expected_tps + 600)
    assert run.cost_usd == pytest.approx(run.duration_seconds / 3600 * 8 * 3.5)


def test_run_estimate_without_dataset_size_explains():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct", dataset={"sizeHints": None})
    run = estimate_run(model_shape(spec.base_model), spec, CATALOG.get("nvidia/l4"), CATALOG, 1)
    assert run.duration_seconds is None and "sizeHints.tokens" in run.note


def test_max_steps_tokens():
    spec = spec_for("hf://Qwen/Qwen2.5-7B-Instruct", training={"maxSteps": 100})
    assert training_tokens(spec) == (100 * 64 * 4096, None)


def test_format_duration():
    assert [format_duration(s) for s in (5, 300, 4800, 200000)] == ["5s", "5m", "1h20m", "2d7h"]
