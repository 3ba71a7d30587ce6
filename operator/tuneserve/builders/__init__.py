"""Pure builders of a FineTuneJob's child objects: plain dicts, deterministic, no API calls."""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.config import build_config_configmap, build_progress_configmap, build_train_config
from tuneserve.builders.rayjob import build_rayjob
from tuneserve.builders.rbac import build_worker_rbac
from tuneserve.catalog import Catalog
from tuneserve.placement import Candidate

__all__ = [
    "build_config_configmap", "build_finetune_children", "build_progress_configmap", "build_rayjob",
    "build_train_config", "build_worker_rbac",
]


def build_finetune_children(job: FineTuneJob, candidate: Candidate, pool: Optional[str], attempt: int,
                            catalog: Catalog) -> list[dict[str, Any]]:
    """Every object one placement attempt needs, in apply order: RBAC and the progress
    ConfigMap (per job), then the config ConfigMap and the RayJob (per attempt)."""
    return [
        *build_worker_rbac(job),
        build_progress_configmap(job),
        build_config_configmap(job, candidate, attempt),
        build_rayjob(job, candidate, pool, attempt, catalog),
    ]
