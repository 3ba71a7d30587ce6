"""The operator's only way of writing to the cluster: server-side apply with one field manager,
deletes, status writes (guarded by the resourceVersion they were planned from), Events, and
guarded JSON patches of objects KubeRay owns. Reads come from kopf's
indexes (indexes.py), not from here; of Secrets only the key names are indexed, never values."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from tuneserve import API_GROUP, API_VERSION, FIELD_MANAGER
from tuneserve.controller.apiclient import APPLY_PATCH, JSON_PATCH, ApiError, Client, object_path
from tuneserve.controller.indexes import CHILD_KINDS, PATCHED_KINDS
from tuneserve.core.plan import Event

EVENT_SOURCE = "tuneserve-operator"

log = logging.getLogger(__name__)

# The plural of each kind the operator applies, deletes or patches, by (apiVersion, kind): the
# children its builders render (CHILD_KINDS) and the RayClusters whose bounds it patches. A fixed
# table instead of API discovery: the set of kinds is fixed by the code (a unit test checks the
# builders' kinds against CHILD_KINDS), so discovery's requests at startup bought nothing.
PLURALS = {(k.api_version, k.kind): k.plural for k in (*CHILD_KINDS, *PATCHED_KINDS)}


def plural_of(api_version: str, kind: str) -> str:
    """The resource name of a kind the operator writes; ValueError for any other kind."""
    try:
        return PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not write {kind} ({api_version}): not in kubeapi.PLURALS "
                         "(CHILD_KINDS or PATCHED_KINDS in controller/indexes.py)") from None


def _path(api_version: str, kind: str, namespace: Optional[str], name: str) -> str:
    return object_path(api_version, plural_of(api_version, kind), namespace, name)


class KubeApi:
    """Writes only: replies are read (so their connections are reused) but only a status write's
    new resourceVersion is taken from them."""
    def __init__(self, client: Client):
        self.client = client

    def apply(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.client.request("PATCH", _path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]),
                            dict(obj), APPLY_PATCH, {"fieldManager": FIELD_MANAGER, "force": "true"})
        log.info("applied %s %s/%s", obj["kind"], meta.get("namespace"), meta["name"])

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        try:
            self.client.request("DELETE", _path(api_version, kind, namespace, name),
                                {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            log.info("deleted %s %s/%s", kind, namespace, name)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def json_patch(self, api_version: str, kind: str, name: str, namespace: str, ops: list[dict[str, Any]]) -> bool:
        """Applies a JSON patch. False, and nothing written, when the object is gone or one of its
        ``test`` ops failed: the object changed since it was read, and the next reconcile plans
        again from the fresh copy."""
        try:
            self.client.request("PATCH", _path(api_version, kind, namespace, name), ops, JSON_PATCH)
        except ApiError as exc:
            if exc.status == 404 or (exc.status == 422 and not exc.causes()):
                # A failed test op is a bare 422 (the API server drops the JSON patch error); an
                # object the schema rejects comes with causes, and is raised.
                log.info("not patching %s %s/%s: gone or changed since it was read", kind, namespace, name)
                return False
            raise
        log.info("patched %s %s/%s", kind, namespace, name)
        return True

    def write_status(self, plural: str, namespace: str, name: str, status: dict[str, Any],
                     resource_version: Optional[str]) -> Optional[str]:
        """Replaces the whole status (a merge patch would leave fields that were dropped), only if
        the object is still at ``resource_version`` (the copy the status was planned from). The
        object's new resourceVersion; None, and nothing written, when it changed since."""
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}] \
            if resource_version else []
        ops.append({"op": "add", "path": "/status", "value": status})
        try:
            written = self.client.request("PATCH", object_path(f"{API_GROUP}/{API_VERSION}", plural, namespace, name,
                                                               "status"), ops, JSON_PATCH)
        except ApiError as exc:
            if exc.status == 409 or (exc.status == 422 and not exc.causes()):
                log.info("not writing the status of %s/%s: it changed since it was read", namespace, name)
                return None
            raise
        return (written.get("metadata") or {}).get("resourceVersion") or ""

    def post_event(self, involved: Mapping[str, Any], event: Event) -> None:
        """A core/v1 Event about ``involved`` (a FineTuneJob or ModelServe body). Never raises: a
        lost Event must not fail or repeat a reconcile whose writes are done."""
        meta = involved.get("metadata") or {}
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "type": event.type, "reason": event.reason, "message": event.message[:1024],
            "source": {"component": EVENT_SOURCE}, "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.client.request("POST", object_path("v1", "events", meta.get("namespace")), body)
        except ApiError as exc:
            log.warning("could not post Event %s on %s/%s: %s", event.reason, meta.get("namespace"), meta.get("name"),
                        exc.reason)
