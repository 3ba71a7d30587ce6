"""The committed CRD is generated from the models, structural, and bounded for CEL cost."""
from __future__ import annotations

import yaml

from tuneserve.tools import crdgen
from tuneserve.api.finetunejob import FineTuneJobSpec


def test_committed_crds_match_the_models():
    for name, content in crdgen.rendered_crds().items():
        committed = (crdgen.CRD_DIR / name).read_text()
        assert committed == content, f"{name} is stale: run `python -m tuneserve.tools.crdgen`"


def _version():
    return crdgen.finetunejob_crd()["spec"]["versions"][0]


def test_schema_is_structural_and_bounded():
    schema = _version()["schema"]["openAPIV3Schema"]
    assert crdgen.check_structural(schema["properties"]["spec"]) == []
    assert crdgen.check_structural(schema["properties"]["status"], bounded=False) == []
    text = yaml.safe_dump(schema)
    for forbidden in ("$ref", "anyOf", "$defs", "title:", "additionalProperties: false", "type: 'null'"):
        assert forbidden not in text


def test_names_subresources_and_columns():
    crd = crdgen.finetunejob_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["tuneserve"] and crd["spec"]["scope"] == "Namespaced"
    version = _version()
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:1] == ["Phase"] and {"Accelerator", "Progress", "Loss", "ETA", "Cost", "Age"} <= set(columns)
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].split(".")[1:]
        if path[0] == "status":
            node = {"properties": status_props}
            for part in path[1:]:
                node = node["properties"][part]
            assert node["type"] == column["type"] if column["type"] != "date" else True


def test_every_rule_is_emitted_and_spec_is_immutable_except_suspend():
    text = yaml.safe_dump(crdgen.finetunejob_crd())
    spec_rules = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    immutable = {r["fieldPath"] for r in spec_rules if "oldSelf" in r["rule"]}
    aliases = {f.alias for f in FineTuneJobSpec.model_fields.values()}
    assert immutable == {f".{a}" for a in aliases - {"suspend"}}
    assert all("has(oldSelf." in r["rule"] for r in spec_rules if "oldSelf" in r["rule"])
    assert "set exactly one of accelerators.choices" in text


def test_cel_regexes_need_no_escapes():
    """URI patterns use no backslashes, so they are the same text in Python, RE2 and CEL."""
    for rule in yaml.safe_load(crdgen.render_yaml(crdgen.finetunejob_crd()).split("\n", 1)[1])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["baseModel"]["x-kubernetes-validations"]:
        assert "\\" not in rule["rule"]


def test_defaults_are_valid():
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["lora"]["default"] == {}
    assert spec["properties"]["method"]["default"] == "lora"
    assert spec["properties"]["training"]["properties"]["precision"]["default"] in spec["properties"]["training"]["properties"]["precision"]["enum"]


def test_fast_defaults_and_the_fp8_rules_reach_the_crd():
    """No default for gradientCheckpointing (unset = automatic), dropout 0, and basePrecision's two
    CEL rules: at the training level (bf16 only) and at the spec level (not with qlora)."""
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    training = spec["properties"]["training"]
    assert "default" not in training["properties"]["gradientCheckpointing"]
    assert spec["properties"]["lora"]["properties"]["dropout"]["default"] == 0.0
    assert training["properties"]["basePrecision"]["enum"] == ["fp8"]
    assert {r.get("fieldPath"): r["rule"] for r in training["x-kubernetes-validations"]}[".basePrecision"] == (
        "!has(self.basePrecision) || !has(self.precision) || self.precision == 'bf16'")
    assert {r.get("fieldPath"): r["rule"] for r in spec["x-kubernetes-validations"]}[".training.basePrecision"] == (
        "self.method != 'qlora' || !has(self.training.basePrecision)")


def _ms_version():
    return crdgen.modelserve_crd()["spec"]["versions"][0]


def test_modelserve_crd_is_structural_bounded_and_mutable():
    crd = crdgen.modelserve_crd()
    assert crd["spec"]["names"]["shortNames"] == ["ms"] and crd["spec"]["names"]["kind"] == "ModelServe"
    schema = _ms_version()["schema"]["openAPIV3Schema"]
    assert crdgen.check_structural(schema["properties"]["spec"]) == []
    assert crdgen.check_structural(schema["properties"]["status"], bounded=False) == []
    text = yaml.safe_dump(crd)
    assert "oldSelf" not in text  # the spec is mutable
    for message in ("adapter names must be unique", "an adapter needs exactly one of fineTuneJobRef or uri",
                    "replicas.min must not exceed replicas.max"):
        assert message in text
    spec = schema["properties"]["spec"]["properties"]
    assert spec["adapters"]["maxItems"] == 32
    assert spec["engine"]["properties"]["quantization"]["enum"] == ["none", "fp8", "awq", "gptq"]


def test_modelserve_printer_columns_point_at_status_fields():
    version = _ms_version()
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Ready", "Adapters", "Endpoint", "Accelerator", "Cost/h", "Age"]
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].split(".")[1:]
        if path[0] == "status":
            node = {"properties": status_props}
            for part in path[1:]:
                node = node["properties"][part]
            assert node["type"] == column["type"]
