"""Per-replica status report for the operator: a ``ServeReplicaReport`` (contract.py) written under
key ``replica_report_key(replica_id)`` of the ConfigMap ``ServeAppConfig.status_configmap``
(merge patch of that one key with the pod's service-account token, so replicas never conflict),
on every adapter state change and every ``SERVE_HEARTBEAT_SECONDS`` (the operator ignores reports
older than ``SERVE_REPORT_STALE_SECONDS``: a dead replica ages out).

``TUNESERVE_SERVE_STATUS_DIR`` additionally (or, outside Kubernetes, only) writes the same
documents as files ``<dir>/<key>``; the tests read those. Publishing never raises.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import urllib.request
from datetime import datetime, timezone
from typing import Callable, Optional

from .. import contract

log = logging.getLogger("tuneserve.serve.report")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STATUS_DIR_ENV = "TUNESERVE_SERVE_STATUS_DIR"


class _ConfigMapAPI:
    """One ConfigMap through the in-cluster API with the pod's service-account token."""

    def __init__(self, ref: str, *, sa_dir: str = SA_DIR, timeout_s: float = 5.0):
        self.namespace, _, self.name = ref.partition("/")
        if not self.name:
            raise ValueError(f"a ConfigMap reference must be '<namespace>/<name>', got {ref!r}")
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api, self.sa_dir, self.timeout_s = f"https://{host}:{port}", sa_dir, timeout_s

    def _call(self, method: str, body: Optional[dict] = None) -> dict:
        with open(os.path.join(self.sa_dir, "token")) as f:
            token = f.read().strip()
        ctx = ssl.create_default_context(cafile=os.path.join(self.sa_dir, "ca.crt"))
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/configmaps/{self.name}"
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
        req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     method=method, headers=headers)
        with urllib.request.urlopen(req, context=ctx, timeout=self.timeout_s) as resp:
            return json.loads(resp.read() or b"{}")


class ConfigMapKeySink(_ConfigMapAPI):
    def write(self, key: str, doc: str) -> None:
        self._call("PATCH", {"data": {key: doc}})


class ConfigMapKeySource(_ConfigMapAPI):
    """Reads one key of a ConfigMap: the desired adapter set as the operator just wrote it, seconds
    earlier than the kubelet refreshes the mounted copy (up to a minute or more)."""

    def __init__(self, ref: str, key: str, **kw):
        super().__init__(ref, **kw)
        self.key = key

    def read(self) -> bytes:
        data = self._call("GET").get("data") or {}
        if self.key not in data:
            raise FileNotFoundError(f"ConfigMap {self.namespace}/{self.name} has no key {self.key!r}")
        return data[self.key].encode()


def in_cluster(sa_dir: str = SA_DIR) -> bool:
    return os.path.exists(os.path.join(sa_dir, "token"))


class FileSink:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def write(self, key: str, doc: str) -> None:
        path = os.path.join(self.directory, key)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(doc)
        os.replace(tmp, path)


def build_report(replica_id: str, state: str, reconciler, message: Optional[str] = None, *,
                 dtype: Optional[str] = None) -> str:
    """The ServeReplicaReport JSON (contract shape when the contract has it, same keys otherwise)."""
    adapters = {}
    if reconciler is not None:
        for st in reconciler.adapters.values():
            adapters[st.name] = {"state": st.state, "uri": st.uri, "message": st.message}
    doc = {"contract_version": contract.CONTRACT_VERSION, "replica_id": replica_id, "state": state,
           "adapters": adapters,
           "adapters_digest": reconciler.file_digest if reconciler is not None else None,
           "adapters_error": reconciler.file_error if reconciler is not None else None,
           "dtype": dtype, "message": message, "updated_at": datetime.now(timezone.utc).isoformat()}
    model = getattr(contract, "ServeReplicaReport", None)
    if model is not None:
        return model.model_validate(doc).model_dump_json()
    return json.dumps(doc)


class StatusPublisher:
    def __init__(self, replica_id: str, snapshot: Callable[[], str], *,
                 configmap: Optional[str] = None):
        self.replica_id = replica_id
        self.snapshot = snapshot
        key_fn = getattr(contract, "replica_report_key", None)
        self.key = key_fn(replica_id) if key_fn else f"replica.{replica_id}.json"
        self.interval = float(getattr(contract, "SERVE_HEARTBEAT_SECONDS", 15))
        self.sinks = []
        if configmap:
            try:
                self.sinks.append(ConfigMapKeySink(configmap))
            except ValueError as e:
                log.warning("status ConfigMap disabled: %s", e)
        if os.environ.get(STATUS_DIR_ENV):
            self.sinks.append(FileSink(os.environ[STATUS_DIR_ENV]))
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def poke(self) -> None:
        self._wake.set()

    def publish_now(self) -> None:
        if not self.sinks:
            return
        doc = self.snapshot()
        for sink in self.sinks:
            try:
                sink.write(self.key, doc)
            except Exception as e:
                log.warning("status report to %s failed: %s", type(sink).__name__, e)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await asyncio.to_thread(self.publish_now)

    def start(self) -> None:
        if self.sinks and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())
