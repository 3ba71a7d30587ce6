"""What a FineTuneJob renders: RBAC for the worker, the progress and config ConfigMaps, the RayJob."""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.core.catalog import Catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve.finetunejob.builders.config import build_config_configmap, build_progress_configmap
from tuneserve.finetunejob.builders.rayjob import build_rayjob
from tuneserve.finetunejob.builders.rbac import build_worker_rbac


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
