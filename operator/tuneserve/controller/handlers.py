"""kopf wiring, kept thin: one reconcile entry point per kind, run on every event of the object and,
from the resync loop (resync.py), when the schedule (schedule.py: a child's event, the plan's
requeue, else the resync) says the object is due. No kopf timers, so no finalizer: an object
deleted while the operator is down goes at once (children through owner references).
The logic lives in each kind's reconcile.py (pure), the reads in indexes.py, the writes in
kubeapi.py. Handlers return nothing and never sleep; they raise kopf.TemporaryError to retry.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional

import kopf

from tuneserve import API_GROUP
from tuneserve.builders.common import JOB_LABEL, SERVE_LABEL, progress_configmap_name
from tuneserve.core.catalog import Catalog, load_catalog
from tuneserve.controller.apiclient import ApiError, Client, connection_info
from tuneserve.controller.applied import RecentlyApplied
from tuneserve.controller.indexes import (
    CHILD_KINDS, FTJ, MANAGED, MS, NAMED_KINDS, PATCHED_KINDS, Lazily, children, everything, known_names, of_kind, reservations,
    secret_keys,
)
from tuneserve.controller.promised import Promised
from tuneserve.core.references import CLUSTER_SCOPED
from tuneserve.controller.kubeapi import KubeApi
from tuneserve.controller.resync import ResyncLoop
from tuneserve.controller.schedule import DEFAULT_RESYNC_SECONDS, Schedule
from tuneserve.core.plan import Plan
from tuneserve.core.scheduling.inventory import TERMINATED_POD_PHASES, node_offer
from tuneserve.finetunejob.placement import job_owner, job_reservation
from tuneserve.finetunejob.reconcile import World, plan_finetunejob
from tuneserve.modelserve.placement import serve_owner, serve_reservation
from tuneserve.modelserve.reconcile import ServeWorld, plan_modelserve

log = logging.getLogger(__name__)
SCHEDULE = Schedule()   # the resync is set at startup (configure), the tick is fixed here
RECONCILE_WORKERS = 16   # kopf's handler threads: reconciles wait on the API server, not the CPU


class Runtime:
    """Process-wide state set once at startup: the API client, the catalog, kopf's indexes (for
    the resync loop, which runs outside kopf's handlers) and the per-object locks."""
    api: Optional[KubeApi] = None
    catalog: Optional[Catalog] = None
    indexes: dict[str, kopf.Index] = {}
    resync: Optional[ResyncLoop] = None
    locks: dict[str, threading.Lock] = {}
    locks_guard = threading.Lock()
    # The status this process last wrote and the resourceVersion it made, per uid: a body from
    # before that write (the watch has not delivered it yet) is planned with it instead.
    written: dict[str, tuple[dict, str]] = {}
    # Children applied a moment ago, not yet in the indexes: not applied again (applied.py).
    recent = RecentlyApplied()
    # Reservations planned a moment ago, not yet in the indexes; plans are made one at a time (promised.py).
    promised = Promised()
    # What each node offered placement when last seen (inventory.node_offer): a change wakes the waiting.
    node_offers: dict[str, str] = {}

    @classmethod
    def latest(cls, body: kopf.Body, uid: str) -> tuple[dict, Optional[str]]:
        """(the body to plan from, the resourceVersion its status write must find). Only the
        operator writes status, so a body whose status differs from the last written one predates
        that write. A refused write drops the entry (``_carry_out``), so a wrong guess heals."""
        raw = dict(body)
        mine = cls.written.get(uid)
        if mine is None or (raw.get("status") or {}) == mine[0]:
            return raw, body.metadata.get("resourceVersion")
        return {**raw, "status": mine[0]}, mine[1]

    @classmethod
    def lock(cls, uid: str) -> threading.Lock:
        with cls.locks_guard:
            return cls.locks.setdefault(uid, threading.Lock())


def _api_client(connections: int) -> Client:
    """A client whose connection pool holds one kept-alive connection per reconcile worker. A pool
    smaller than the workers (the `kubernetes` client's default was 10 here) made every write
    beyond it open a new TLS connection and drop it: a third of the operator's time in handshakes."""
    return Client.from_environment(connections)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in as the operator's own writes do (apiclient.connection_info). Without
    a login handler kopf logs in through the `kubernetes` client whenever it is installed."""
    return connection_info(settings)


def _load_catalog() -> Catalog:
    """Defaults shipped with the package, merged with the Helm chart's ConfigMap when mounted."""
    path = os.environ.get("TUNESERVE_CATALOG_OVERRIDE")
    override = Path(path).read_text() if path and Path(path).exists() else None
    return load_catalog(override)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING   # kopf's own noise; our Events are posted explicitly
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.execution.max_workers = RECONCILE_WORKERS
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"   # earlier versions added it; kopf now removes it
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    Runtime.api = KubeApi(_api_client(RECONCILE_WORKERS + 2))   # + the resync loop, + one spare
    Runtime.catalog = _load_catalog()
    SCHEDULE.set_resync(float(os.environ.get("TUNESERVE_RESYNC_SECONDS", DEFAULT_RESYNC_SECONDS)))
    Runtime.indexes = _indexes(kwargs)   # kopf's live index objects, filled as the watches stream
    Runtime.resync = ResyncLoop(SCHEDULE, plan_due)
    Runtime.resync.start()


@kopf.on.cleanup()
def stop_resync(**_: Any) -> None:
    if Runtime.resync is not None:
        Runtime.resync.stop()


# ----------------------------------------------------------------------------------- reconcile

def _reservations(indexes: Mapping[str, kopf.Index]) -> Lazily:
    """Every placed object's reservation, this process's newest plans over the indexes' copies;
    computed only if the plan places (Lazily)."""
    return Lazily(lambda: Runtime.promised.merged(reservations(indexes)))


def _world(namespace: str, name: str, indexes: Mapping[str, kopf.Index]) -> World:
    key = (JOB_LABEL, namespace, name)
    live = children(key, indexes)
    progress = live.get(("ConfigMap", progress_configmap_name(name)))
    return World(nodes=Lazily(lambda: everything(indexes["nodes_index"])),
                 pods=Lazily(lambda: everything(indexes["pods_index"])),
                 job_pods=everything(indexes["pods_index"], key), ray_jobs=of_kind(live, "RayJob"), children=live,
                 progress_configmap=progress, secrets=secret_keys(namespace, indexes),
                 known=known_names(namespace, indexes), reservations=_reservations(indexes))


def _carry_out(plan: Plan, body: kopf.Body, plural: str, namespace: str, name: str, uid: str,
               version: Optional[str]) -> None:
    """Status first, guarded by the resourceVersion it was planned from (it records the attempt
    before the attempt's children exist, so a crash at any point converges to one attempt), then
    its Events, then the children."""
    api = Runtime.api
    try:
        if plan.status is not None:
            new_version = api.write_status(plural, namespace, name, plan.status, version)
            if new_version is None:
                Runtime.written.pop(uid, None)
                return   # changed since it was read: its own event plans it again from the new copy
            Runtime.written[uid] = (plan.status, new_version)
        for event in plan.events:
            api.post_event(body, event)
        for obj in plan.apply:
            if not Runtime.recent.just_applied(obj):
                api.apply(obj)
                Runtime.recent.record(obj)
        for api_version, kind, child in plan.delete:
            api.delete(api_version, kind, child, namespace)
        for patch in plan.patch:
            if api.json_patch(patch.api_version, patch.kind, patch.name, namespace, patch.ops) and patch.event:
                api.post_event(body, patch.event)
    except ApiError as exc:
        if exc.status == 404 or (exc.status == 403 and "being terminated" in (exc.body or "")):
            return   # the object or its namespace is going away
        raise kopf.TemporaryError(f"API error {exc.status}: {exc.reason}: {(exc.body or '')[:300]}", delay=5)


def _schedule(plural: str, namespace: str, name: str, plan: Plan, planned_from: Mapping[str, Any]) -> None:
    """When to plan it next (schedule.py): sooner while it waits for capacity. Also after an API
    error, so a failing write is retried at the schedule's pace, not at every tick."""
    phase = (plan.status or planned_from.get("status") or {}).get("phase")
    key = (plural, namespace, name)
    SCHEDULE.planned(key, time.monotonic(), plan.requeue_after, settled=phase not in (None, "Pending"),
                     for_capacity=phase == "Waiting")
    SCHEDULE.wait_for(key, [(kind, None if kind in CLUSTER_SCOPED else namespace, ref) for kind, ref in plan.waiting_for])


def _planned(latest: Mapping[str, Any], plan: Plan) -> Mapping[str, Any]:
    """The object as its plan leaves it: the status it writes, else the one it was planned from."""
    return {**latest, "status": plan.status} if plan.status is not None else latest


def reconcile_finetunejob(body: kopf.Body, namespace: str, name: str, uid: str, indexes: Mapping[str, kopf.Index]) -> None:
    with Runtime.lock(uid):
        latest, version = Runtime.latest(body, uid)
        with Runtime.promised.planning:
            plan = plan_finetunejob(latest, _world(namespace, name, indexes), Runtime.catalog, datetime.now(timezone.utc))
            Runtime.promised.record(job_owner(namespace, name), job_reservation(_planned(latest, plan)))
        try:
            _carry_out(plan, body, "finetunejobs", namespace, name, uid, version)
        finally:
            _schedule("finetunejobs", namespace, name, plan, latest)


def _serve_world(body: kopf.Body, namespace: str, name: str, indexes: Mapping[str, kopf.Index]) -> ServeWorld:
    key = (SERVE_LABEL, namespace, name)
    refs = {a.get("fineTuneJobRef", {}).get("name") for a in (body.spec.get("adapters") or [])} - {None}
    jobs = {ref: next(iter(indexes["finetunejobs_index"].get((namespace, ref), [])), None) for ref in refs}
    ray_clusters = {obj["metadata"]["name"]: obj for obj in indexes["rayclusters_index"].get(key, [])}
    return ServeWorld(nodes=Lazily(lambda: everything(indexes["nodes_index"])),
                      pods=Lazily(lambda: everything(indexes["pods_index"])),
                      serve_pods=everything(indexes["pods_index"], key), children=children(key, indexes), jobs=jobs,
                      secrets=secret_keys(namespace, indexes), ray_clusters=ray_clusters,
                      known=known_names(namespace, indexes), reservations=_reservations(indexes))


def reconcile_modelserve(body: kopf.Body, namespace: str, name: str, uid: str, indexes: Mapping[str, kopf.Index]) -> None:
    with Runtime.lock(uid):
        latest, version = Runtime.latest(body, uid)
        with Runtime.promised.planning:
            plan = plan_modelserve(latest, _serve_world(body, namespace, name, indexes), Runtime.catalog,
                                   datetime.now(timezone.utc))
            Runtime.promised.record(serve_owner(namespace, name), serve_reservation(_planned(latest, plan)))
        try:
            _carry_out(plan, body, "modelserves", namespace, name, uid, version)
        finally:
            _schedule("modelserves", namespace, name, plan, latest)


def _indexes(kwargs: Mapping[str, Any]) -> dict[str, kopf.Index]:
    return {k: v for k, v in kwargs.items() if k.endswith("_index") or k.startswith("children_")}


def _deleted(plural: str, body: kopf.Body, event_type: Optional[str] = None) -> bool:
    """Deleted or being deleted: forget it. Children go through owner references; artifacts and
    checkpoints are never touched."""
    if event_type == "DELETED" or body.metadata.get("deletionTimestamp"):
        Runtime.written.pop(body.metadata.get("uid"), None)
        owner = job_owner if plural == "finetunejobs" else serve_owner
        Runtime.promised.forget(owner(body.metadata.get("namespace") or "default", body.metadata.get("name") or ""))
        SCHEDULE.forget((plural, body.metadata.get("namespace"), body.metadata.get("name")))
        return True
    return False


def plan_due(key: Hashable) -> None:
    """The resync loop's entry (resync.py): plan the object at ``key`` from its index entry, or
    forget it when it is gone or being deleted."""
    plural, namespace, name = key
    body = next(iter(Runtime.indexes[f"{plural}_index"].get((namespace, name), [])), None)
    if body is None or _deleted(plural, kopf.Body(body)):
        SCHEDULE.forget(key)
        return
    reconcile = reconcile_finetunejob if plural == "finetunejobs" else reconcile_modelserve
    reconcile(kopf.Body(body), namespace, name, body["metadata"]["uid"], Runtime.indexes)


def _releases_capacity(body: kopf.Body, type: Optional[str]) -> bool:
    """Deleted, being deleted or finished: its reservation and pods free their nodes."""
    return type == "DELETED" or bool(body.metadata.get("deletionTimestamp")) or \
        (body.status or {}).get("phase") in ("Succeeded", "Failed")


@kopf.on.event(*FTJ)
def finetunejob_event(body: kopf.Body, namespace: str, name: str, uid: str, type: Optional[str], **kwargs: Any) -> None:
    if not _deleted("finetunejobs", body, type):
        reconcile_finetunejob(body, namespace, name, uid, _indexes(kwargs))
    SCHEDULE.wake_namespace("modelserves", namespace)   # their adapters may come from this job
    if _releases_capacity(body, type):
        SCHEDULE.capacity_freed()


@kopf.on.event(*MS)
def modelserve_event(body: kopf.Body, namespace: str, name: str, uid: str, type: Optional[str], **kwargs: Any) -> None:
    if not _deleted("modelserves", body, type):
        reconcile_modelserve(body, namespace, name, uid, _indexes(kwargs))
    if _releases_capacity(body, type):
        SCHEDULE.capacity_freed()


@kopf.on.event("", "v1", "pods")
def pod_capacity(body: kopf.Body, type: Optional[str], **_: Any) -> None:
    """A pod that finished or went away frees its node's requests: the waiting may fit now."""
    if type == "DELETED" or (body.status or {}).get("phase") in TERMINATED_POD_PHASES:
        SCHEDULE.capacity_freed()


@kopf.on.event("", "v1", "nodes")
def node_capacity(body: kopf.Body, name: str, type: Optional[str], **_: Any) -> None:
    """A node added, or changing what it offers (not a heartbeat): the waiting may fit now."""
    if type == "DELETED":
        Runtime.node_offers.pop(name, None)
        return
    offer = node_offer(body)
    if Runtime.node_offers.get(name) != offer:
        Runtime.node_offers[name] = offer
        SCHEDULE.capacity_freed()


def _wake_owner(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
    """A child changed (a RayJob's or RayService's status, a progress or serve-status report, a pod
    unschedulable): its owner is planned at the next tick (schedule.py)."""
    for label, plural in ((JOB_LABEL, "finetunejobs"), (SERVE_LABEL, "modelserves")):
        if label in labels:
            SCHEDULE.wake((plural, namespace, labels[label]))


for _child in (*CHILD_KINDS, *PATCHED_KINDS):
    kopf.on.event(_child.group, _child.version, _child.plural, labels=MANAGED, id=f"wake_owner_of_{_child.plural}")(_wake_owner)
for _label in (JOB_LABEL, SERVE_LABEL):
    kopf.on.event("", "v1", "pods", labels={_label: kopf.PRESENT}, id=f"wake_owner_of_pods_{_label.rsplit('/', 1)[1]}")(_wake_owner)


def _wake_blocked_on(kind: str):
    def wake(name: str, namespace: Optional[str], **_: Any) -> None:
        """An object a spec may name changed (created, most likely): wake the owners blocked on it."""
        SCHEDULE.appeared((kind, namespace, name))
    return wake


for _group, _version, _plural, _kind in NAMED_KINDS:
    kopf.on.event(_group, _version, _plural, id=f"wake_blocked_on_{_plural}")(_wake_blocked_on(_kind))
