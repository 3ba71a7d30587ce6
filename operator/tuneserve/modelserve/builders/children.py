"""What a ModelServe renders: RBAC for the replicas, the status and adapters ConfigMaps, the RayService."""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.api.modelserve import ModelServe
from tuneserve.modelserve.builders.rayservice import build_rayservice
from tuneserve.core.catalog import Catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve.modelserve.builders.rbac import build_serve_rbac
from tuneserve.modelserve.builders.serve import build_adapters_configmap, build_serve_status_configmap
from tuneserve_workers.contract import ServeAdapter


def build_modelserve_children(serve: ModelServe, candidate: Candidate, pool: Optional[str],
                              desired: list[ServeAdapter], catalog: Catalog) -> list[dict[str, Any]]:
    """Every object a placed ModelServe needs, in apply order: RBAC, the status ConfigMap
    (create-if-missing: replicas own its data), the adapters ConfigMap (mounted by the pods), the
    RayService. ``desired``: ``modelserve.adapters.resolve_adapters(...).desired``."""
    return [
        *build_serve_rbac(serve),
        build_serve_status_configmap(serve),
        build_adapters_configmap(serve, desired),
        build_rayservice(serve, candidate, pool, catalog, [a.uri for a in desired]),
    ]
