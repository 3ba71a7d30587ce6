"""Shared helpers for the unit tests: the examples, the invalid cases, a test fleet snapshot."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tuneserve.api.finetunejob import FineTuneJob

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "crds" / "examples").glob("finetunejob-*.yaml"))
MODELSERVE_EXAMPLES = sorted((REPO / "crds" / "examples").glob("modelserve-*.yaml"))
INVALID_CASES_FILE = Path(__file__).parent / "data" / "invalid_finetunejobs.yaml"
INVALID_MODELSERVES_FILE = Path(__file__).parent / "data" / "invalid_modelserves.yaml"


def merge_patch(base: Any, patch: Any) -> Any:
    """JSON-merge-patch semantics (RFC 7386): maps merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def invalid_cases(path: Path = INVALID_CASES_FILE) -> list[dict[str, Any]]:
    """Each case with its full `manifest` (and `base` for update cases)."""
    doc = yaml.safe_load(path.read_text())
    return [{**case, "base": doc["base"], "manifest": merge_patch(doc["base"], case["patch"])} for case in doc["cases"]]


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "crds" / "examples" / name).read_text())


def llama_spec(size: str, choice: dict[str, Any] | None = None, **spec: Any):
    """A LoRA job on hf://meta-llama/Llama-3.1-<size> with the API's defaults otherwise (bf16, rank
    16, all-linear, micro batch 1, 2048 tokens), 100 steps, one accelerator choice."""
    body = {"apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "llama", "namespace": "default"},
            "spec": {"baseModel": {"uri": f"hf://meta-llama/Llama-3.1-{size}"}, "dataset": {"uri": "s3://demo/chat.jsonl"},
                     "output": {"uri": "s3://demo/adapters/llama"}, "training": {"maxSteps": 100},
                     "accelerators": {"choices": [choice or {"vendor": "nvidia"}]}, **spec}}
    return FineTuneJob.from_body(body).spec


def node(name: str, pool: str, instance_type: str, labels: dict[str, str] | None = None,
         resource: str | None = None, devices: int = 0, taint: str | None = None,
         cpu: str = "192", memory: str = "2048Gi") -> dict[str, Any]:
    """A Node dict shaped like the lead's local fleet (kwok)."""
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
    if resource:
        allocatable[resource] = str(devices)
    return {
        "metadata": {"name": name, "labels": {"node.kubernetes.io/instance-type": instance_type,
                                              "tuneserve.dev/pool": pool, **(labels or {})}},
        "spec": {"taints": [{"key": taint, "value": "present", "effect": "NoSchedule"}] if taint else []},
        "status": {"allocatable": allocatable, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def fleet() -> list[dict[str, Any]]:
    """Test fleet with the exact labels/resources/taints of the local control plane."""
    nv = {"nvidia.com/gpu.present": "true"}
    return [
        node("h100-a", "h100", "p5.48xlarge", {**nv, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "nvidia.com/gpu", 8, "nvidia.com/gpu"),
        node("h100-b", "h100", "p5.48xlarge", {**nv, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "nvidia.com/gpu", 8, "nvidia.com/gpu"),
        node("l4-a", "l4", "g6.xlarge", {**nv, "nvidia.com/gpu.product": "NVIDIA-L4"}, "nvidia.com/gpu", 1, "nvidia.com/gpu", cpu="4", memory="16Gi"),
        node("a10g-a", "a10g", "g5.12xlarge", {**nv, "nvidia.com/gpu.product": "NVIDIA-A10G"}, "nvidia.com/gpu", 4, "nvidia.com/gpu", cpu="48", memory="192Gi"),
        node("mi300x-a", "mi300x", "mi300x-8", {"amd.com/gpu.product-name": "AMD-Instinct-MI300X"}, "amd.com/gpu", 8, "amd.com/gpu"),
        node("ascend-a", "ascend", "ascend-910b-8", {"accelerator": "huawei-Ascend910B"}, "huawei.com/Ascend910", 8, "huawei.com/Ascend910"),
        node("gaudi-a", "gaudi", "dl1-gaudi2-8", {"habana.ai/gaudi.product": "HL-225"}, "habana.ai/gaudi", 8, "habana.ai/gaudi"),
        node("cpu-a", "cpu", "m7i.8xlarge", cpu="32", memory="128Gi"),
    ]


def pod_on(node_name: str, resource: str, count: int, phase: str = "Running") -> dict[str, Any]:
    return {"spec": {"nodeName": node_name, "containers": [{"resources": {"limits": {resource: str(count)}}}]},
            "status": {"phase": phase}}
