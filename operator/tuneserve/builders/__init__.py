"""Pure builders of FineTuneJob and ModelServe child objects: plain dicts, deterministic, no API calls."""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.modelserve import ModelServe
from tuneserve.builders.config import build_config_configmap, build_progress_configmap, build_train_config
from tuneserve.builders.rayjob import build_rayjob
from tuneserve.builders.rayservice import build_rayservice, build_serve_config_v2, raycluster_scaling_patch
from tuneserve.builders.rbac import build_serve_rbac, build_worker_rbac
from tuneserve.builders.serve import (
    build_adapters_configmap, build_serve_app_config, build_serve_status_configmap, endpoint_url,
)
from tuneserve.catalog import Catalog
from tuneserve.placement import Candidate
from tuneserve_workers.contract import ServeAdapter

__all__ = [
    "build_adapters_configmap", "build_config_configmap", "build_finetune_children", "build_modelserve_children",
    "build_progress_configmap", "build_rayjob", "build_rayservice", "build_serve_app_config", "build_serve_config_v2",
    "build_serve_rbac", "build_serve_status_configmap", "build_train_config", "build_worker_rbac", "endpoint_url",
    "raycluster_scaling_patch",
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


def build_modelserve_children(serve: ModelServe, candidate: Candidate, pool: Optional[str],
                              desired: list[ServeAdapter], catalog: Catalog) -> list[dict[str, Any]]:
    """Every object a placed ModelServe needs, in apply order: RBAC, the status ConfigMap
    (create-if-missing: replicas own its data), the adapters ConfigMap (mounted by the pods), the
    RayService. ``desired``: ``adapters.resolve_adapters(...).desired``."""
    return [
        *build_serve_rbac(serve),
        build_serve_status_configmap(serve),
        build_adapters_configmap(serve, desired),
        build_rayservice(serve, candidate, pool, catalog, [a.uri for a in desired]),
    ]
