"""What the operator renders and predicts for the throughput benchmark's job.

The FineTuneJob a user would apply for a Llama-3-8B-shaped model on one H200 with the API's
defaults (micro batch and sequence length set to the benchmark's), placed by the operator's own
code (``decide_placement`` against a one-node inventory) and rendered into the worker's contract
(``build_train_config``): the bench trains with what that config says and holds the measured
peak memory to the placement's sizing. Imports the operator package (pydantic, pyyaml); no
cluster is involved.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

PRODUCT = "h200"


def job_body(batch: int, seq: int, overrides: Optional[dict] = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "hf://meta-llama/Meta-Llama-3-8B",
                      "sizeHints": {"parametersBillions": 8.03, "layers": 32, "hiddenSize": 4096, "vocabSize": 128256}},
        "dataset": {"uri": "s3://bench/chat.jsonl"},
        "output": {"uri": "s3://bench/adapters/llama8b"},
        "training": {"maxSteps": 20, "microBatchSize": batch, "globalBatchSize": batch, "maxSeqLength": seq},
        "accelerators": {"choices": [{"vendor": "nvidia", "product": PRODUCT}]},
    }
    for key, value in (overrides or {}).items():   # "training.gradientCheckpointing": False
        node = spec
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "bench", "namespace": "bench"}, "spec": copy.deepcopy(spec)}


def _inventory(catalog):
    from tuneserve.core.scheduling.inventory import build_inventory
    profile, = catalog.find("nvidia", PRODUCT)
    node = {"metadata": {"name": "h200-0", "labels": {**profile.node_labels, "tuneserve.dev/pool": PRODUCT}},
            "spec": {"taints": []},
            "status": {"allocatable": {"cpu": "64", "memory": "1Ti", "pods": "110", profile.resource_name: "1"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}
    return build_inventory([node], [])


def rendered(batch: int, seq: int, overrides: Optional[dict] = None):
    """(the worker's TrainJobConfig, the placement decision) for the benchmark's job."""
    from tuneserve.api.finetunejob import FineTuneJob
    from tuneserve.core.catalog import load_catalog
    from tuneserve.finetunejob.builders.config import build_train_config
    from tuneserve.finetunejob.placement import decide_placement
    catalog = load_catalog()
    job = FineTuneJob.from_body(job_body(batch, seq, overrides))
    decision = decide_placement(job.spec, catalog, _inventory(catalog))
    if decision.candidate is None or decision.memory is None:
        raise RuntimeError(f"the operator would not place the benchmark's job: {decision.reason}")
    return build_train_config(job, decision.candidate, 1), decision
