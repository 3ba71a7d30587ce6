"""The workers' one Kubernetes client: one key of one ConfigMap through the in-cluster API.

Both in-cluster channels of the workers go through here: the training progress sink
(train/progress.py, a merge patch of ``progress.json``) and the serve replica's report writer and
desired-adapters reader (serve/report.py, a merge patch of its own key, a GET of the adapters
key). A merge patch of one key never conflicts with other writers of the same ConfigMap; the serve
replicas' pruning of stale reports is guarded by the ``resourceVersion`` it read instead
(``patch(..., resource_version=)``, ``Conflict`` when another writer came first).

Credentials are the pod's service-account token and CA in ``/var/run/secrets/kubernetes.io/
serviceaccount``; ``TUNESERVE_SERVICEACCOUNT_DIR`` overrides that directory for a worker run
outside a pod (the demo runs the real worker against the local control plane, the tests against
a fake API server). It is read when a client is made, so every user honours it the same way.

Plain urllib on purpose: two requests on one resource do not justify a client library (and its
dependency tree) in every Ray pod. The operator has its own pooled urllib3 client
(operator/tuneserve/controller/apiclient.py: kubeconfig logins, many writers); the workers never
import the operator, so the two stay apart.
"""
from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Optional

SA_DIR_ENV = "TUNESERVE_SERVICEACCOUNT_DIR"
DEFAULT_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TIMEOUT_S = 5.0


def service_account_dir() -> str:
    """Where the token and CA are: ``TUNESERVE_SERVICEACCOUNT_DIR`` or the pod's mount."""
    return os.environ.get(SA_DIR_ENV, DEFAULT_SA_DIR)


def in_cluster(sa_dir: Optional[str] = None) -> bool:
    """Whether a service-account token is there to talk to the API server with."""
    return os.path.exists(os.path.join(sa_dir or service_account_dir(), "token"))


def api_server() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    return f"https://{host}:{port}"


class Conflict(Exception):
    """409: the ConfigMap changed since the resourceVersion a guarded write was planned from."""


class ConfigMap:
    """One ConfigMap, ``ref`` = "<namespace>/<name>"; ``what`` names the setting in errors."""

    def __init__(self, ref: str, *, sa_dir: Optional[str] = None, api: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "a ConfigMap reference"):
        self.namespace, _, self.name = ref.partition("/")
        if not self.name:
            raise ValueError(f"{what} must be '<namespace>/<name>', got {ref!r}")
        self.api = api or api_server()
        self.sa_dir = sa_dir or service_account_dir()
        self.timeout_s = timeout_s

    def patch_key(self, key: str, doc: str) -> None:
        """Merge-patch ``data[key] = doc`` (other keys stay as they are)."""
        self._call("PATCH", {"data": {key: doc}})

    def read(self) -> tuple[dict, str]:
        """(data, resourceVersion) of the ConfigMap as it is now."""
        obj = json.loads(self._call("GET") or b"{}")
        return obj.get("data") or {}, (obj.get("metadata") or {}).get("resourceVersion", "")

    def patch(self, data: dict, *, resource_version: str) -> None:
        """Merge-patch ``data`` (a None value deletes its key), only if the ConfigMap is still at
        ``resource_version``; Conflict otherwise."""
        try:
            self._call("PATCH", {"metadata": {"resourceVersion": resource_version}, "data": data})
        except urllib.error.HTTPError as e:
            if e.code == 409:
                raise Conflict(f"ConfigMap {self.namespace}/{self.name} changed since "
                               f"resourceVersion {resource_version}") from e
            raise

    def get_key(self, key: str) -> bytes:
        """``data[key]``; FileNotFoundError when the ConfigMap has no such key."""
        data = json.loads(self._call("GET") or b"{}").get("data") or {}
        if key not in data:
            raise FileNotFoundError(f"ConfigMap {self.namespace}/{self.name} has no key {key!r}")
        return data[key].encode()

    def _call(self, method: str, body: Optional[dict] = None) -> bytes:
        with open(os.path.join(self.sa_dir, "token")) as f:
            token = f.read().strip()
        ctx = ssl.create_default_context(cafile=os.path.join(self.sa_dir, "ca.crt"))
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/configmaps/{self.name}"
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
            data = json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, context=ctx, timeout=self.timeout_s) as resp:
            return resp.read()
