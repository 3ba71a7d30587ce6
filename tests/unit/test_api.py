"""The typed FineTuneJob API: examples parse, invalid specs fail with the CRD's messages."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from helpers import EXAMPLES, invalid_cases, load_example, merge_patch
from tuneserve.api.finetunejob import MUTABLE_SPEC_FIELDS, NAME_RULE, FineTuneJob, FineTuneJobSpec
from tuneserve_workers.contract import Method

CASES = invalid_cases()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    import yaml
    job = FineTuneJob.from_body(yaml.safe_load(path.read_text()))
    assert job.spec.output.uri
    assert NAME_RULE.check(job.metadata.name)


def test_user_story_example_reads_as_written():
    job = FineTuneJob.from_body(load_example("finetunejob-qwen-bank.yaml"))
    spec = job.spec
    assert spec.base_model.display_name() == "Qwen2.5-7B-Instruct"
    assert [(c.vendor, c.product) for c in spec.accelerators.choices] == [("nvidia", "H100"), ("amd", "MI300X"), ("huawei", "Ascend910B")]
    assert spec.effective_checkpoint().interval_minutes == 10
    assert spec.output.uri == "s3://bank/adapters/fin-v1"
    assert spec.method == Method.lora


def test_defaults_fill_in():
    job = FineTuneJob.from_body(load_example("finetunejob-minimal.yaml"))
    assert job.metadata.namespace == "default"
    assert job.spec.lora.rank == 16 and job.spec.lora.target_modules == ["all-linear"]
    ckpt = job.spec.effective_checkpoint()
    assert ckpt.uri == "s3://demo/adapters/tiny/checkpoints" and ckpt.interval_minutes == 10 and ckpt.keep == 3
    assert job.spec.suspend is False and job.spec.backoff_limit == 2
    # Fast by default (issue 16): no LoRA dropout, recompute decided per placement, the base in bf16.
    training = job.spec.training
    assert job.spec.lora.dropout == 0.0
    assert (training.gradient_checkpointing, training.base_precision) == (None, None)


@pytest.mark.parametrize("training,recompute,base", [
    ({"gradientCheckpointing": True}, True, None),     # true and false still accepted: they force it
    ({"gradientCheckpointing": False}, False, None),
    ({"basePrecision": "fp8"}, None, "fp8"),
])
def test_gradient_checkpointing_and_base_precision_as_written(training, recompute, base):
    job = FineTuneJob.from_body(merge_patch(load_example("finetunejob-minimal.yaml"), {"spec": {"training": training}}))
    assert job.spec.training.gradient_checkpointing is recompute
    assert (job.spec.training.base_precision and job.spec.training.base_precision.value) == base


def test_revision_is_split_from_hf_uri():
    job = FineTuneJob.from_body(load_example("finetunejob-auto.yaml"))
    assert job.spec.base_model.revision() == "main"
    assert job.spec.base_model.location() == "hf://Qwen/Qwen2.5-32B-Instruct"


def test_at_least_15_distinct_invalid_cases():
    assert len({c["name"] for c in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("case", [c for c in CASES if c.get("pydantic", True) and not c.get("update")], ids=lambda c: c["name"])
def test_invalid_spec_rejected_by_models(case):
    with pytest.raises(ValidationError) as err:
        FineTuneJob.from_body(case["manifest"])
    # CEL-mirrored rules carry the CRD's message; schema bounds carry the field path (camelCase).
    assert case["expect"] in str(err.value)


def test_name_rule_mirrors_cel():
    case = next(c for c in CASES if c["name"] == "name-too-long")
    assert not NAME_RULE.check(case["manifest"]["metadata"]["name"])
    assert not NAME_RULE.check("9starts-with-digit")
    assert NAME_RULE.check("fin-v1")


TRANSITION_RULES = {r.field_path: r for r in FineTuneJobSpec.rules if "oldSelf" in r.cel}


def _changed(old, new) -> list[str]:
    old_wire, new_wire = old.to_wire(), new.to_wire()
    return sorted(k for k in set(old_wire) | set(new_wire) if old_wire.get(k) != new_wire.get(k))


@pytest.mark.parametrize("case", [c for c in CASES if c.get("update")], ids=lambda c: c["name"])
def test_each_rejected_update_changes_a_field_with_a_transition_rule(case):
    changed = _changed(FineTuneJob.from_body(case["base"]).spec, FineTuneJob.from_body(case["manifest"]).spec)
    assert changed and case["expect"].startswith(f"spec.{changed[0]}")
    rule = TRANSITION_RULES[f".{changed[0]}"]
    assert rule.message.startswith(f"spec.{changed[0]} is immutable")


def test_every_spec_field_but_suspend_has_a_transition_rule():
    fields = {info.alias for info in FineTuneJobSpec.model_fields.values()}
    assert MUTABLE_SPEC_FIELDS == {"suspend"}
    assert set(TRANSITION_RULES) == {f".{f}" for f in fields - MUTABLE_SPEC_FIELDS}


def test_secret_values_have_no_field():
    """Credentials are references only: a literal value is an unknown field."""
    base = load_example("finetunejob-minimal.yaml")
    with pytest.raises(ValidationError):
        FineTuneJob.from_body(merge_patch(base, {"spec": {"credentials": {"huggingFaceToken": {"name": "a", "key": "b", "value": "hf_x"}}}}))


def test_admission_knows_the_catalogs_names():
    """The names the CRD enforces are the ones the operator's catalog resolves (one data file)."""
    from tuneserve.api.workload import CATALOG_PRODUCTS
    from tuneserve.core.catalog import load_catalog
    known: dict[str, set[str]] = {}
    for profile in load_catalog().profiles:
        known.setdefault(profile.vendor, set()).update(n.lower() for n in (profile.product, *profile.aliases))
    assert {vendor: set(names) for vendor, names in CATALOG_PRODUCTS.items()} == known


@pytest.mark.parametrize("uri", ["s3://demo/a..b/chat.jsonl", "pvc://data/.hidden/x", "/data/x../y", "hf://org/name/..data"])
def test_dots_inside_a_segment_are_no_parent_segment(uri):
    body = merge_patch(load_example("finetunejob-minimal.yaml"), {"spec": {"dataset": {"uri": uri}}})
    assert FineTuneJob.from_body(body).spec.dataset.uri == uri


def test_product_names_are_case_insensitive_and_vendor_checked():
    body = merge_patch(load_example("finetunejob-minimal.yaml"), {"spec": {
        "accelerators": {"choices": [{"vendor": "nvidia", "product": "h100-SXM"}, {"product": "Trainium"}]}}})
    assert [c.product for c in FineTuneJob.from_body(body).spec.accelerators.choices] == ["h100-SXM", "Trainium"]
