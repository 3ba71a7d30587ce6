"""The typed ModelServe API: examples parse, invalid specs fail with the CRD's messages, shared
types are the FineTuneJob's."""
from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from helpers import INVALID_MODELSERVES_FILE, MODELSERVE_EXAMPLES, invalid_cases, load_example, merge_patch
from tuneserve.api import finetunejob, modelserve
from tuneserve.api.modelserve import NAME_RULE, ModelServe, Quantization
from tuneserve.modelserve.reconcile import rollout_fingerprint

CASES = invalid_cases(INVALID_MODELSERVES_FILE)


def test_examples_exist():
    assert {p.name for p in MODELSERVE_EXAMPLES} >= {"modelserve-qwen-bank.yaml", "modelserve-minimal.yaml"}


@pytest.mark.parametrize("path", MODELSERVE_EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    serve = ModelServe.from_body(yaml.safe_load(path.read_text()))
    assert NAME_RULE.check(serve.metadata.name)


def test_user_story_example_reads_as_written():
    spec = ModelServe.from_body(load_example("modelserve-qwen-bank.yaml")).spec
    assert spec.model_name() == "Qwen2.5-7B-Instruct"
    assert [(a.name, a.source()) for a in spec.adapters] == [("fin-v1", "FineTuneJob fin-v1"), ("support-v3", "s3://bank/adapters/support-v3")]
    assert [c.label() for c in spec.accelerators.choices] == ["nvidia/H100", "amd/MI300X"]
    assert (spec.replicas.min, spec.replicas.max) == (1, 4)


def test_defaults_fill_in():
    spec = ModelServe.from_body(load_example("modelserve-minimal.yaml")).spec
    assert spec.adapters == [] and spec.engine.tensor_parallel_size is None
    assert spec.engine.gpu_memory_utilization is None and spec.engine.quantization == Quantization.none
    assert (spec.replicas.min, spec.replicas.max) == (1, 1)


def test_engine_memory_share_defaults_per_accelerator():
    """Unset, the catalog decides: 0.9 of a GPU's memory, 0.5 of a CPU pod's (Ray shares it:
    vLLM refused to start in a real 5 GiB CPU pod at 0.9). A value set in the spec wins."""
    from tuneserve.core.catalog import load_catalog
    catalog = load_catalog()
    assert catalog.get("cpu/cpu").memory_utilization(None) == 0.5
    assert catalog.find("nvidia", "H100")[0].memory_utilization(None) == 0.9
    assert catalog.get("cpu/cpu").memory_utilization(0.7) == 0.7


def test_shares_the_finetunejob_types():
    fields = modelserve.ModelServeSpec.model_fields
    assert fields["base_model"].annotation is finetunejob.BaseModelSource
    assert fields["credentials"].annotation == finetunejob.FineTuneJobSpec.model_fields["credentials"].annotation
    assert issubclass(finetunejob.AcceleratorChoice, modelserve.AcceleratorSelector)
    assert modelserve.ServeAcceleratorRequest.model_fields["choices"].annotation == list[modelserve.AcceleratorSelector]


def test_at_least_15_distinct_invalid_cases():
    assert len({c["name"] for c in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("case", [c for c in CASES if c.get("pydantic", True)], ids=lambda c: c["name"])
def test_invalid_spec_rejected_by_models(case):
    with pytest.raises(ValidationError) as err:
        ModelServe.from_body(case["manifest"])
    assert case["expect"] in _readable(err.value)


def _readable(err: ValidationError) -> str:
    """pydantic locations (snake_case tuples) rendered like the apiserver's field paths."""
    parts = [str(err)]
    alias = {"base_model": "baseModel", "fine_tune_job_ref": "fineTuneJobRef", "gpu_memory_utilization": "gpuMemoryUtilization",
             "max_lora_rank": "maxLoraRank", "tensor_parallel_size": "tensorParallelSize", "target_ongoing_requests": "targetOngoingRequests",
             "extra_engine_args": "extraEngineArgs"}
    for e in err.errors():
        path = ""
        for loc in e["loc"]:
            path += f"[{loc}]" if isinstance(loc, int) else f".{alias.get(loc, loc)}"
        parts.append(path.lstrip("."))
    return "\n".join(parts)


def test_name_rule_mirrors_cel():
    case = next(c for c in CASES if c["name"] == "name-too-long")
    assert not NAME_RULE.check(case["manifest"]["metadata"]["name"])
    assert NAME_RULE.check("bank-llm") and not NAME_RULE.check("9lives")


def test_adapter_and_replica_changes_do_not_roll_out():
    base = load_example("modelserve-qwen-bank.yaml")
    old = rollout_fingerprint(ModelServe.from_body(base))
    changed = ModelServe.from_body(merge_patch(base, {"spec": {"adapters": [{"name": "x", "uri": "s3://ads/x"}], "replicas": {"max": 8}}}))
    assert rollout_fingerprint(changed) == old
    engine = ModelServe.from_body(merge_patch(base, {"spec": {"engine": {"maxModelLen": 8192}}}))
    assert rollout_fingerprint(engine) != old


def test_every_quantization_is_a_method_of_the_installed_vllm():
    """What the serve app passes as --quantization must be a vLLM method, for every API value."""
    from tuneserve.api.modelserve import VLLM_QUANTIZATION
    methods = pytest.importorskip("vllm.model_executor.layers.quantization").QUANTIZATION_METHODS
    assert set(VLLM_QUANTIZATION) == set(Quantization)
    for quantization, method in VLLM_QUANTIZATION.items():
        assert (method is None) == (quantization is Quantization.none)
        assert method is None or method in methods, f"{quantization.value} -> {method} is not a vLLM method"


def test_catalog_offers_only_api_quantizations():
    from tuneserve.core.catalog import load_catalog
    for profile in load_catalog().profiles:
        assert set(profile.serving_quantizations) <= {q.value for q in Quantization} - {"none"}, profile.key
