"""The operator's only way of writing to the cluster: server-side apply with one field manager,
deletes, status writes, and guarded JSON patches of objects KubeRay owns. Reads come from kopf's
indexes (indexes.py), not from here; of Secrets only the key names are indexed, never values."""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from tuneserve import API_GROUP, API_VERSION, FIELD_MANAGER

log = logging.getLogger(__name__)


def _causes(exc: ApiException) -> list:
    try:
        return (json.loads(exc.body or "{}").get("details") or {}).get("causes") or []
    except (ValueError, AttributeError):
        return []


class KubeApi:
    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.dyn = dynamic.DynamicClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def apply(self, obj: Mapping[str, Any]) -> None:
        res = self.dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        res.server_side_apply(body=dict(obj), name=meta["name"], namespace=meta.get("namespace"),
                              field_manager=FIELD_MANAGER, force_conflicts=True)
        log.info("applied %s %s/%s", obj["kind"], meta.get("namespace"), meta["name"])

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        res = self.dyn.resources.get(api_version=api_version, kind=kind)
        try:
            res.delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"})
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
            res.patch(body=ops, name=name, namespace=namespace, content_type="application/json-patch+json")
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 422 and not _causes(exc)):
                # A failed test op is a bare 422 (the API server drops the JSON patch error); an
                # object the schema rejects comes with causes, and is raised.
                log.info("not patching %s %s/%s: gone or changed since it was read", kind, namespace, name)
                return False
            raise
        log.info("patched %s %s/%s", kind, namespace, name)
        return True

    def write_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replaces the whole status (a merge patch would leave fields that were dropped)."""
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, plural, name,
            body=[{"op": "add", "path": "/status", "value": status}],
            _content_type="application/json-patch+json")
