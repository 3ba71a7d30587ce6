"""kopf indexes: the operator's read side. Nodes and pods (slimmed) and the placed objects'
reservations for placement, the FineTuneJobs
ModelServes read their adapters from, RayClusters for the replica bounds, Secrets' key names, the
names of the ServiceAccounts, PersistentVolumeClaims and PriorityClasses a spec may name, and every child kind the
builders render, under (owner label, namespace, owner name). ``CHILD_KINDS`` is the one registry of
those child kinds: it registers their indexes, and a unit test checks that every kind a builder
returns is in it (a child without an index would be re-applied on every reconcile)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TypeVar

import kopf

from tuneserve import API_GROUP, API_VERSION
from tuneserve.builders.common import JOB_LABEL, MANAGED_BY, SERVE_LABEL
from tuneserve.core.references import KnownNames
from tuneserve.core.scheduling.reservations import Reservation
from tuneserve.finetunejob.placement import job_reservation
from tuneserve.modelserve.placement import serve_reservation

T = TypeVar("T")
FTJ = (API_GROUP, API_VERSION, "finetunejobs")
MS = (API_GROUP, API_VERSION, "modelserves")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass(frozen=True)
class ChildKind:
    """A kind the operator renders and applies, indexed by owner."""
    api_version: str   # "v1", "rbac.authorization.k8s.io/v1", ...
    kind: str
    plural: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def index_id(self) -> str:
        return f"children_{self.plural}"


CHILD_KINDS = (
    ChildKind("v1", "ConfigMap", "configmaps"),
    ChildKind("v1", "ServiceAccount", "serviceaccounts"),
    ChildKind("rbac.authorization.k8s.io/v1", "Role", "roles"),
    ChildKind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    ChildKind("ray.io/v1", "RayJob", "rayjobs"),
    ChildKind("ray.io/v1", "RayService", "rayservices"),
)
# Kinds the operator does not render but patches: a RayService's RayClusters (their replica bounds).
PATCHED_KINDS = (ChildKind("ray.io/v1", "RayCluster", "rayclusters"),)


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object's metadata without managedFields (no planner reads them; they are the largest
    part of a small object's metadata, and the indexes hold every object: issue 15)."""
    return {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}


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
    return {None: {"metadata": _metadata(body), "spec": dict(body.spec), "status": dict(body.status)}}


@kopf.index("pods")
def pods_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    slim = _slim_pod(body)
    keys = {None: slim}
    for owner_label in (JOB_LABEL, SERVE_LABEL):
        if owner_label in labels:
            keys[(owner_label, namespace, labels[owner_label])] = slim
    return keys


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


@kopf.index("", "v1", "secrets")
def secrets_index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    """Secret key names per namespace, never values: the planners check the children's
    secretKeyRefs against them (no Secret GET per reconcile)."""
    keys = frozenset((body.get("data") or {}).keys()) | frozenset((body.get("stringData") or {}).keys())
    return {namespace: (name, keys)}


# Objects a spec may name (core/references.py), by name only: the planners say which is missing.
NAMED_KINDS = (("", "v1", "serviceaccounts", "ServiceAccount"), ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
               ("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass"))


def _name_only(name: str, namespace: Optional[str], **_: Any) -> dict:
    """Namespace (None: cluster-scoped) -> the object's name; nothing else of it is kept."""
    return {namespace: name}


for _group, _version, _plural, _kind in NAMED_KINDS:
    kopf.index(_group, _version, _plural, id=f"{_plural}_index")(_name_only)


def _owner_body(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": _metadata(body),
            "spec": dict(body.spec), "status": dict(body.status)}


@kopf.index(*FTJ)
def finetunejobs_index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    """The resync plans a due FineTuneJob from here; ModelServes read the FineTuneJobs their
    adapters come from (phase, artifact, base model)."""
    return {(namespace, name): _owner_body(body)}


@kopf.index(*MS)
def modelserves_index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    """The resync plans a due ModelServe from here."""
    return {(namespace, name): _owner_body(body)}


@kopf.index(*FTJ)
def job_reservations_index(body: kopf.Body, **_: Any) -> dict:
    """What each placed FineTuneJob holds until its workers are bound (core/scheduling/reservations.py),
    parsed once per event, not once per placement."""
    reservation = job_reservation(body)
    return {None: reservation} if reservation is not None else {}


@kopf.index(*MS)
def serve_reservations_index(body: kopf.Body, **_: Any) -> dict:
    """What each placed ModelServe holds until its workers are bound."""
    reservation = serve_reservation(body)
    return {None: reservation} if reservation is not None else {}


def reservations(indexes: Mapping[str, kopf.Index]) -> list[Reservation]:
    """Every placed object's reservation, as the indexes last saw them."""
    return everything(indexes["job_reservations_index"]) + everything(indexes["serve_reservations_index"])


def _slim_child(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the planners read of a child: its kind, name and annotations (the applied hash, the
    rollout fingerprint), its status (RayJob, RayService) and a ConfigMap's data (the progress and
    serve-status reports). Not the spec: a RayJob's pod templates are most of its size."""
    slim = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": _metadata(body)}
    slim.update({k: body[k] for k in ("status", "data") if k in body})
    return slim


def _child_index(body: kopf.Body, namespace: str, labels: Mapping[str, str], **_: Any) -> dict:
    """Children are indexed under (owner label, namespace, owner name)."""
    slim = _slim_child(body)
    return {(owner_label, namespace, labels[owner_label]): slim
            for owner_label in (JOB_LABEL, SERVE_LABEL) if owner_label in labels}


for _child in CHILD_KINDS:
    kopf.index(_child.group, _child.version, _child.plural, labels=MANAGED, id=_child.index_id)(_child_index)


def everything(index: kopf.Index, key: Any = None) -> list:
    return list(index.get(key, []))


class Lazily(Iterable[T]):
    """An iterable computed on first use. The cluster-wide lists (every node, pod and reservation)
    only matter to a plan that places; a settled object's plan (the resync's, most of them at rest)
    then never builds them."""

    def __init__(self, compute: Callable[[], Iterable[T]]):
        self._compute: Optional[Callable[[], Iterable[T]]] = compute
        self._items: tuple[T, ...] = ()

    def __iter__(self) -> Iterator[T]:
        if self._compute is not None:
            self._items, self._compute = tuple(self._compute()), None
        return iter(self._items)


def children(key: tuple, indexes: Mapping[str, kopf.Index]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(kind, name) -> live child of the owner ``key``, over every child kind's index."""
    return {(obj["kind"], obj["metadata"]["name"]): obj
            for child in CHILD_KINDS for obj in indexes[child.index_id].get(key, [])}


def secret_keys(namespace: str, indexes: Mapping[str, kopf.Index]) -> dict[str, frozenset[str]]:
    """The namespace's Secrets: name -> key names."""
    return dict(indexes["secrets_index"].get(namespace, []))


def known_names(namespace: str, indexes: Mapping[str, kopf.Index]) -> KnownNames:
    """What a spec in ``namespace`` may name and exists: its ServiceAccounts and claims, the
    cluster's PriorityClasses."""
    def names(plural: str, key: Optional[str]) -> frozenset[str]:
        return frozenset(indexes[f"{plural}_index"].get(key, []))
    return KnownNames(service_accounts=names("serviceaccounts", namespace),
                      claims=names("persistentvolumeclaims", namespace), priority_classes=names("priorityclasses", None))


def of_kind(live: Mapping[tuple[str, str], Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    """The live children of one kind, by name."""
    return {name: obj for (k, name), obj in live.items() if k == kind}
