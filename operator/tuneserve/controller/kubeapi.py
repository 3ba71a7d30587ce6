"""The operator's only way of writing to the cluster: server-side apply with one field manager,
deletes, status writes (guarded by the resourceVersion they were planned from), Events, and
guarded JSON patches of objects KubeRay owns. Reads come from kopf's
indexes (indexes.py), not from here; of Secrets only the key names are indexed, never values."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from tuneserve import API_GROUP, API_VERSION, FIELD_MANAGER
from tuneserve.core.plan import Event

EVENT_SOURCE = "tuneserve-operator"

log = logging.getLogger(__name__)


def _causes(exc: ApiException) -> list:
    try:
        return (json.loads(exc.body or "{}").get("details") or {}).get("causes") or []
    except (ValueError, AttributeError):
        return []


def _discard(response: Any) -> None:
    """Reads an unread reply to its end and hands its connection back to the pool (an unread one
    cannot be reused, so the next write would open a new TLS connection)."""
    response.drain_conn()
    response.release_conn()


class KubeApi:
    """Writes only: no response is turned into objects (``serialize=False``, ``_preload_content=False``):
    nothing reads them, and wrapping a RayJob's reply in the client's models cost more CPU than the
    write itself in a burst of creates."""
    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.dyn = dynamic.DynamicClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def apply(self, obj: Mapping[str, Any]) -> None:
        res = self.dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        _discard(res.server_side_apply(body=dict(obj), name=meta["name"], namespace=meta.get("namespace"),
                                       field_manager=FIELD_MANAGER, force_conflicts=True, serialize=False))
        log.info("applied %s %s/%s", obj["kind"], meta.get("namespace"), meta["name"])

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        res = self.dyn.resources.get(api_version=api_version, kind=kind)
        try:
            _discard(res.delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"},
                                serialize=False))
            log.info("deleted %s %s/%s", kind, namespace, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def json_patch(self, api_version: str, kind: str, name: str, namespace: str, ops: list[dict[str, Any]]) -> bool:
        """Applies a JSON patch. False, and nothing written, when the object is gone or one of its
        ``test`` ops failed: the object changed since it was read, and the next reconcile plans
        again from the fresh copy."""
        res = self.dyn.resources.get(api_version=api_version, kind=kind)
        try:
            _discard(res.patch(body=ops, name=name, namespace=namespace, content_type="application/json-patch+json",
                               serialize=False))
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 422 and not _causes(exc)):
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
            written = self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, plural, name, body=ops, _content_type="application/json-patch+json")
        except ApiException as exc:
            if exc.status == 409 or (exc.status == 422 and not _causes(exc)):
                log.info("not writing the status of %s/%s: it changed since it was read", namespace, name)
                return None
            raise
        return (written.get("metadata") or {}).get("resourceVersion") or ""

    def post_event(self, involved: Mapping[str, Any], event: Event) -> None:
        """A core/v1 Event about ``involved`` (a FineTuneJob or ModelServe body). Never raises: a
        lost Event must not fail or repeat a reconcile whose writes are done."""
        meta = involved.get("metadata") or {}
        now = datetime.now(timezone.utc)
        body = {
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "type": event.type, "reason": event.reason, "message": event.message[:1024],
            "source": {"component": EVENT_SOURCE}, "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            _discard(self.core.create_namespaced_event(meta.get("namespace"), body, _preload_content=False))
        except ApiException as exc:
            log.warning("could not post Event %s on %s/%s: %s", event.reason, meta.get("namespace"), meta.get("name"),
                        exc.reason)
