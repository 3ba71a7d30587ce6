"""kopf wiring, kept thin: indexes of what the reconcile needs, and one reconcile entry point run
on every FineTuneJob event and on a timer. The logic lives in reconcile.py (pure) and kubeapi.py
(writes). Handlers return nothing and never sleep; they raise kopf.TemporaryError to retry.
"""
from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tuneserve import API_GROUP, API_VERSION
from tuneserve.builders.common import JOB_LABEL, MANAGED_BY, progress_configmap_name
from tuneserve.catalog import Catalog, load_catalog
from tuneserve.kubeapi import KubeApi
from tuneserve.reconcile import World, plan_finetunejob

log = logging.getLogger(__name__)
FTJ = (API_GROUP, API_VERSION, "finetunejobs")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
RESYNC_SECONDS = float(os.environ.get("TUNESERVE_RESYNC_SECONDS", "3"))


class Runtime:
    """Process-wide state set once at startup: the API client and the catalog."""
    api: Optional[KubeApi] = None
    catalog: Optional[Catalog] = None
    locks: dict[str, threading.Lock] = {}
    locks_guard = threading.Lock()

    @classmethod
    def lock(cls, uid: str) -> threading.Lock:
        with cls.locks_guard:
            return cls.locks.setdefault(uid, threading.Lock())


def _load_catalog() -> Catalog:
    """Defaults shipped with the package, merged with the Helm chart's ConfigMap when mounted."""
    path = os.environ.get("TUNESERVE_CATALOG_OVERRIDE")
    override = Path(path).read_text() if path and Path(path).exists() else None
    return load_catalog(override)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING   # kopf's own noise; our Events are posted explicitly
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.execution.max_workers = 8
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    Runtime.api = KubeApi(client.ApiClient())
    Runtime.catalog = _load_catalog()


# ------------------------------------------------------------------------------------- indexes

def _slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """What placement and fallback need of a pod: no env, no volumes, no secrets."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    return {
        "metadata": {"name": body["metadata"]["name"], "namespace": body["metadata"].get("namespace"),
                     "labels": dict(body["metadata"].get("labels") or {})},
        "spec": {"nodeName": spec.get("nodeName"),
                 "containers": [{"resources": c.get("resources") or {}} for c in spec.get("containers") or []],
                 "initContainers": [{"resources": c.get("resources") or {}} for c in spec.get("initContainers") or []],
                 "overhead": spec.get("overhead")},
        "status": {"phase": status.get("phase"), "conditions": list(status.get("conditions") or [])},
    }


@kopf.index("nodes")
def nodes_index(body: kopf.Body, **_: Any) -> dict:
    return {None: {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}}


@kopf.index("pods")
def pods_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    slim = _slim_pod(body)
    keys = {None: slim}
    if JOB_LABEL in labels:
        keys[(namespace, labels[JOB_LABEL])] = slim
    return keys


@kopf.index("ray.io", "v1", "rayjobs", labels=MANAGED)
def rayjobs_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    return {(namespace, labels.get(JOB_LABEL)): dict(body)}


def _child_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    return {(namespace, labels.get(JOB_LABEL)): dict(body)}


for _resource in (("", "v1", "configmaps"), ("", "v1", "serviceaccounts"),
                  ("rbac.authorization.k8s.io", "v1", "roles"), ("rbac.authorization.k8s.io", "v1", "rolebindings")):
    kopf.index(*_resource, labels=MANAGED, id=f"children_{_resource[2]}")(_child_index)


# ----------------------------------------------------------------------------------- reconcile

def _all(index: kopf.Index, key: Any = None) -> list:
    return list(index.get(key, []))


def _world(namespace: str, name: str, indexes: Mapping[str, kopf.Index]) -> World:
    key = (namespace, name)
    children = {}
    for idx_name in ("children_configmaps", "children_serviceaccounts", "children_roles", "children_rolebindings",
                     "rayjobs_index"):
        for obj in indexes[idx_name].get(key, []):
            children[(obj["kind"], obj["metadata"]["name"])] = obj
    ray_jobs = {obj["metadata"]["name"]: obj for obj in indexes["rayjobs_index"].get(key, [])}
    progress = children.get(("ConfigMap", progress_configmap_name(name)))
    api = Runtime.api
    return World(nodes=_all(indexes["nodes_index"]), pods=_all(indexes["pods_index"]),
                 job_pods=_all(indexes["pods_index"], key), ray_jobs=ray_jobs, children=children,
                 progress_configmap=progress, secret_keys=lambda secret: api.secret_keys(namespace, secret))


def reconcile_finetunejob(body: kopf.Body, namespace: str, name: str, uid: str, indexes: Mapping[str, kopf.Index]) -> None:
    with Runtime.lock(uid):
        plan = plan_finetunejob(body, _world(namespace, name, indexes), Runtime.catalog, datetime.now(timezone.utc))
        api = Runtime.api
        try:
            for obj in plan.apply:
                api.apply(obj)
            for api_version, kind, child in plan.delete:
                api.delete(api_version, kind, child, namespace)
            if plan.status is not None:
                api.write_status("finetunejobs", namespace, name, plan.status)
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 403 and "being terminated" in (exc.body or "")):
                return   # the job or its namespace is going away
            raise kopf.TemporaryError(f"API error {exc.status}: {exc.reason}: {(exc.body or '')[:300]}", delay=5)
        for event in plan.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _indexes(kwargs: Mapping[str, Any]) -> dict[str, kopf.Index]:
    return {k: v for k, v in kwargs.items() if k.endswith("_index") or k.startswith("children_")}


@kopf.on.event(*FTJ)
def finetunejob_event(body: kopf.Body, namespace: str, name: str, uid: str, type: Optional[str], **kwargs: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return   # children go through owner references; artifacts and checkpoints are never touched
    reconcile_finetunejob(body, namespace, name, uid, _indexes(kwargs))


@kopf.timer(*FTJ, interval=RESYNC_SECONDS, idle=None)
def finetunejob_resync(body: kopf.Body, namespace: str, name: str, uid: str, **kwargs: Any) -> None:
    if body.metadata.get("deletionTimestamp"):
        return
    reconcile_finetunejob(body, namespace, name, uid, _indexes(kwargs))
