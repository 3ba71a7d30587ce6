"""Generate the CRDs in ``crds/`` from the pydantic models: ``python -m tuneserve.tools.crdgen``.

Pydantic emits JSON Schema 2020-12; the apiserver wants a *structural* OpenAPI v3 schema. The
translation: inline every ``$ref``; ``anyOf[X, null]`` (Optional) becomes X, not required;
drop ``title`` and ``additionalProperties: false`` (unknown fields are pruned/rejected by the
apiserver anyway); numeric ``exclusiveMinimum: n`` becomes ``minimum: n, exclusiveMinimum: true``;
``const`` becomes a one-value enum; status carries no defaults (the operator owns all of it).
``check_structural`` asserts what the apiserver would refuse or what would make CEL too costly:
a node without a type, an unbounded string or list inside the spec.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from tuneserve import API_GROUP, API_VERSION
from tuneserve.api import finetunejob as ftj
from tuneserve.api import modelserve as ms
from tuneserve.api.modelserve_status import ModelServeStatus
from tuneserve.api.finetunejob_status import FineTuneJobStatus

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = REPO_ROOT / "crds"

FINETUNEJOB_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Accelerator", "type": "string", "jsonPath": ".status.placement.accelerator"},
    {"name": "Pool", "type": "string", "jsonPath": ".status.placement.pool", "priority": 1},
    {"name": "Parallel", "type": "string", "jsonPath": ".status.placement.dataParallel", "priority": 1},
    {"name": "Recompute", "type": "boolean", "jsonPath": ".status.placement.gradientCheckpointing", "priority": 1},
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.placement.attempt", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Cost", "type": "string", "jsonPath": ".status.usage.cost"},
    {"name": "Why", "type": "string", "jsonPath": ".status.placement.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

MODELSERVE_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.replicas.summary"},
    {"name": "Adapters", "type": "string", "jsonPath": ".status.adapterSummary"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Accelerator", "type": "string", "jsonPath": ".status.placement.accelerator"},
    {"name": "Cost/h", "type": "string", "jsonPath": ".status.cost"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    {"name": "Why", "type": "string", "jsonPath": ".status.placement.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP_KEYS = {"title"}


def to_structural(schema: dict[str, Any], *, keep_defaults: bool = True) -> dict[str, Any]:
    """Translate a pydantic JSON schema (with $defs) into an inlined structural schema."""
    defs = schema.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        if "$ref" in node:
            target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[1]])
            node = {**target, **node}
        if "anyOf" in node:
            branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"unsupported union: {branches}")
            if node.get("default", ...) is None:
                node.pop("default")
            inner = convert(branches[0])
            node = {**inner, **{k: v for k, v in node.items()}}
            return convert(node)
        if "const" in node:
            node["enum"] = [node.pop("const")]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
                node[plain] = node[bound]
                node[bound] = True
        if node.get("additionalProperties") is False:
            node.pop("additionalProperties")
        if not keep_defaults:
            node.pop("default", None)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP_KEYS or key == "$defs":
                continue
            if key == "properties":
                out[key] = {name: convert(prop) for name, prop in value.items()}
            elif key in ("items", "additionalProperties"):
                out[key] = convert(value)
            else:
                out[key] = value
        return out

    return convert(schema)


def check_structural(schema: dict[str, Any], path: str = "", bounded: bool = True) -> list[str]:
    """Problems the apiserver would reject (missing types) or CEL cost would trip on (unbounded
    strings/lists/maps, when ``bounded``)."""
    problems: list[str] = []
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path or '<root>'}: no type")
    kind = schema.get("type")
    if bounded and kind == "string" and "maxLength" not in schema and "enum" not in schema and "format" not in schema:
        problems.append(f"{path}: string without maxLength")
    if bounded and kind == "array" and "maxItems" not in schema:
        problems.append(f"{path}: array without maxItems")
    if bounded and kind == "object" and "additionalProperties" in schema and "maxProperties" not in schema:
        problems.append(f"{path}: map without maxProperties")
    if "default" in schema and "enum" in schema and schema["default"] not in schema["enum"]:
        problems.append(f"{path}: default not in enum")
    for name, prop in schema.get("properties", {}).items():
        problems += check_structural(prop, f"{path}.{name}", bounded)
    if isinstance(schema.get("items"), dict):
        problems += check_structural(schema["items"], f"{path}[]", bounded)
    if isinstance(schema.get("additionalProperties"), dict):
        problems += check_structural(schema["additionalProperties"], f"{path}{{}}", bounded)
    return problems


def _resource_schema(spec_cls: type, status_cls: type, description: str, name_rule: Any) -> dict[str, Any]:
    spec = to_structural(spec_cls.model_json_schema(by_alias=True, mode="validation"))
    status = to_structural(status_cls.model_json_schema(by_alias=True, mode="serialization"), keep_defaults=False)
    status["description"] = "Observed state, written by the operator only."
    return {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
        "x-kubernetes-validations": [name_rule.as_schema()],
    }


def _crd(module: Any, schema: dict[str, Any], columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{module.PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": module.KIND,
                "listKind": f"{module.KIND}List",
                "plural": module.PLURAL,
                "singular": module.KIND.lower(),
                "shortNames": list(module.SHORT_NAMES),
                "categories": ["tuneserve"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            }],
        },
    }


def finetunejob_schema() -> dict[str, Any]:
    return _resource_schema(
        ftj.FineTuneJobSpec, FineTuneJobStatus,
        "FineTuneJob fine-tunes an open model with LoRA/QLoRA on the first acceptable accelerator and writes the adapter to object storage.",
        ftj.NAME_RULE)


def finetunejob_crd() -> dict[str, Any]:
    """The FineTuneJob CustomResourceDefinition as a dict."""
    return _crd(ftj, finetunejob_schema(), FINETUNEJOB_PRINTER_COLUMNS)


def modelserve_schema() -> dict[str, Any]:
    return _resource_schema(
        ms.ModelServeSpec, ModelServeStatus,
        "ModelServe serves an open model and its LoRA adapters with vLLM on Ray Serve behind one OpenAI-compatible endpoint, on the first acceptable accelerator.",
        ms.NAME_RULE)


def modelserve_crd() -> dict[str, Any]:
    """The ModelServe CustomResourceDefinition as a dict."""
    return _crd(ms, modelserve_schema(), MODELSERVE_PRINTER_COLUMNS)


def render_yaml(doc: dict[str, Any]) -> str:
    header = "# Generated by `python -m tuneserve.tools.crdgen` from operator/tuneserve/api. Do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=True, width=120, allow_unicode=True)


def rendered_crds() -> dict[str, str]:
    """File name -> content of every generated CRD."""
    return {
        f"{API_GROUP}_{ftj.PLURAL}.yaml": render_yaml(finetunejob_crd()),
        f"{API_GROUP}_{ms.PLURAL}.yaml": render_yaml(modelserve_crd()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CRD_DIR)
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, content in rendered_crds().items():
        target = args.out / name
        if args.check:
            if not target.exists() or target.read_text() != content:
                stale.append(str(target))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            print(f"wrote {target}")
    if stale:
        print("stale: " + ", ".join(stale) + " (run python -m tuneserve.tools.crdgen)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
