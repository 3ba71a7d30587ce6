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
from tuneserve.builders.common import JOB_LABEL, MANAGED_BY, SERVE_LABEL, progress_configmap_name
from tuneserve.catalog import Catalog, load_catalog
from tuneserve.kubeapi import KubeApi
from tuneserve.reconcile import Plan, World, plan_finetunejob
from tuneserve.reconcile_serve import ServeWorld, plan_modelserve

log = logging.getLogger(__name__)
FTJ = (API_GROUP, API_VERSION, "finetunejobs")
MS = (API_GROUP, API_VERSION, "modelserves")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
RESYNC_SECONDS = float(os.environ.get("TUNESERVE_RESYNC_SECONDS", "3"))


class Runtime:
    """Process-wide state set once at startup: the API client and the catalog."""
    api: Optional[KubeApi] = None
    catalog: Optional[Catalog] = None
    locks: dict[str, threading.Lock] = {}
    locks_guard = threading.Lock()
    # The status this process last wrote, per object. Only the operator writes status, so this is
    # the newest one even when kopf hands over a body from before that write (no double Events).
    written: dict[str, dict] = {}

    @classmethod
    def with_latest_status(cls, body: kopf.Body, uid: str) -> dict:
        status = cls.written.get(uid)
        return dict(body) if status is None else {**dict(body), "status": status}

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
    for owner_label in (JOB_LABEL, SERVE_LABEL):
        if owner_label in labels:
            keys[(owner_label, namespace, labels[owner_label])] = slim
    return keys


def _owner_keys(body: kopf.Body, namespace: str, labels: Mapping[str, str]) -> dict:
    """Children are indexed under (owner label, namespace, owner name)."""
    return {(owner_label, namespace, labels[owner_label]): dict(body)
            for owner_label in (JOB_LABEL, SERVE_LABEL) if owner_label in labels}


@kopf.index("ray.io", "v1", "rayjobs", labels=MANAGED)
def rayjobs_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    return _owner_keys(body, namespace, labels)


def _child_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    return _owner_keys(body, namespace, labels)


def _slim_raycluster(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the replica-bounds patch needs of a RayCluster: its worker groups' names and counts."""
    keep = ("groupName", "replicas", "minReplicas", "maxReplicas")
    groups = (body.get("spec") or {}).get("workerGroupSpecs") or []
    return {"metadata": {"name": body["metadata"]["name"], "namespace": body["metadata"].get("namespace")},
            "spec": {"workerGroupSpecs": [{k: g[k] for k in keep if k in g} for g in groups]}}


@kopf.index("ray.io", "v1", "rayclusters", labels=MANAGED)
def rayclusters_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    """RayClusters KubeRay made from a ModelServe's RayService (it copies the RayService's labels),
    under the ModelServe's key. The FineTuneJobs' RayJob clusters are not needed."""
    if SERVE_LABEL not in labels:
        return {}
    return {(SERVE_LABEL, namespace, labels[SERVE_LABEL]): _slim_raycluster(body)}


for _resource in (("", "v1", "configmaps"), ("", "v1", "serviceaccounts"),
                  ("rbac.authorization.k8s.io", "v1", "roles"), ("rbac.authorization.k8s.io", "v1", "rolebindings"),
                  ("ray.io", "v1", "rayservices")):
    kopf.index(*_resource, labels=MANAGED, id=f"children_{_resource[2]}")(_child_index)


@kopf.index(*FTJ)
def finetunejobs_index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    """ModelServes read the FineTuneJobs their adapters come from (phase, artifact, base model)."""
    return {(namespace, name): {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}}


# ----------------------------------------------------------------------------------- reconcile

def _all(index: kopf.Index, key: Any = None) -> list:
    return list(index.get(key, []))


CHILD_INDEXES = ("children_configmaps", "children_serviceaccounts", "children_roles", "children_rolebindings",
                 "children_rayservices", "rayjobs_index")


def _children(key: tuple, indexes: Mapping[str, kopf.Index]) -> dict:
    return {(obj["kind"], obj["metadata"]["name"]): obj for idx in CHILD_INDEXES for obj in indexes[idx].get(key, [])}


def _world(namespace: str, name: str, indexes: Mapping[str, kopf.Index]) -> World:
    key = (JOB_LABEL, namespace, name)
    children = _children(key, indexes)
    ray_jobs = {obj["metadata"]["name"]: obj for obj in indexes["rayjobs_index"].get(key, [])}
    progress = children.get(("ConfigMap", progress_configmap_name(name)))
    api = Runtime.api
    return World(nodes=_all(indexes["nodes_index"]), pods=_all(indexes["pods_index"]),
                 job_pods=_all(indexes["pods_index"], key), ray_jobs=ray_jobs, children=children,
                 progress_configmap=progress, secret_keys=lambda secret: api.secret_keys(namespace, secret))


def _carry_out(plan: Plan, body: kopf.Body, plural: str, namespace: str, name: str, uid: str) -> None:
    api = Runtime.api
    patched = []
    try:
        for obj in plan.apply:
            api.apply(obj)
        for api_version, kind, child in plan.delete:
            api.delete(api_version, kind, child, namespace)
        for patch in plan.patch:
            if api.json_patch(patch.api_version, patch.kind, patch.name, namespace, patch.ops) and patch.event:
                patched.append(patch.event)
        if plan.status is not None:
            api.write_status(plural, namespace, name, plan.status)
            Runtime.written[uid] = plan.status
    except ApiException as exc:
        if exc.status == 404 or (exc.status == 403 and "being terminated" in (exc.body or "")):
            return   # the object or its namespace is going away
        raise kopf.TemporaryError(f"API error {exc.status}: {exc.reason}: {(exc.body or '')[:300]}", delay=5)
    for event in plan.events + patched:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def reconcile_finetunejob(body: kopf.Body, namespace: str, name: str, uid: str, indexes: Mapping[str, kopf.Index]) -> None:
    with Runtime.lock(uid):
        plan = plan_finetunejob(Runtime.with_latest_status(body, uid), _world(namespace, name, indexes),
                                Runtime.catalog, datetime.now(timezone.utc))
        _carry_out(plan, body, "finetunejobs", namespace, name, uid)


def _serve_world(body: kopf.Body, namespace: str, name: str, indexes: Mapping[str, kopf.Index]) -> ServeWorld:
    key = (SERVE_LABEL, namespace, name)
    refs = {a.get("fineTuneJobRef", {}).get("name") for a in (body.spec.get("adapters") or [])} - {None}
    jobs = {ref: next(iter(indexes["finetunejobs_index"].get((namespace, ref), [])), None) for ref in refs}
    ray_clusters = {obj["metadata"]["name"]: obj for obj in indexes["rayclusters_index"].get(key, [])}
    api = Runtime.api
    return ServeWorld(nodes=_all(indexes["nodes_index"]), pods=_all(indexes["pods_index"]),
                      serve_pods=_all(indexes["pods_index"], key), children=_children(key, indexes), jobs=jobs,
                      secret_keys=lambda secret: api.secret_keys(namespace, secret), ray_clusters=ray_clusters)


def reconcile_modelserve(body: kopf.Body, namespace: str, name: str, uid: str, indexes: Mapping[str, kopf.Index]) -> None:
    with Runtime.lock(uid):
        plan = plan_modelserve(Runtime.with_latest_status(body, uid), _serve_world(body, namespace, name, indexes),
                               Runtime.catalog, datetime.now(timezone.utc))
        _carry_out(plan, body, "modelserves", namespace, name, uid)


def _indexes(kwargs: Mapping[str, Any]) -> dict[str, kopf.Index]:
    return {k: v for k, v in kwargs.items() if k.endswith("_index") or k.startswith("children_")}


@kopf.on.event(*FTJ)
def finetunejob_event(body: kopf.Body, namespace: str, name: str, uid: str, type: Optional[str], **kwargs: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        Runtime.written.pop(uid, None)
        return   # children go through owner references; artifacts and checkpoints are never touched
    reconcile_finetunejob(body, namespace, name, uid, _indexes(kwargs))


@kopf.timer(*FTJ, interval=RESYNC_SECONDS, idle=None)
def finetunejob_resync(body: kopf.Body, namespace: str, name: str, uid: str, **kwargs: Any) -> None:
    if body.metadata.get("deletionTimestamp"):
        return
    reconcile_finetunejob(body, namespace, name, uid, _indexes(kwargs))


@kopf.on.event(*MS)
def modelserve_event(body: kopf.Body, namespace: str, name: str, uid: str, type: Optional[str], **kwargs: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        Runtime.written.pop(uid, None)
        return
    reconcile_modelserve(body, namespace, name, uid, _indexes(kwargs))


@kopf.timer(*MS, interval=RESYNC_SECONDS, idle=None)
def modelserve_resync(body: kopf.Body, namespace: str, name: str, uid: str, **kwargs: Any) -> None:
    if body.metadata.get("deletionTimestamp"):
        return
    reconcile_modelserve(body, namespace, name, uid, _indexes(kwargs))
