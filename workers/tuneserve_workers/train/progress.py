"""Progress reporting through the channel documented in contract.py.

``progress.json`` goes beside the checkpoints (durable); when ``TUNESERVE_PROGRESS_CONFIGMAP``
("<namespace>/<name>") is set, the same document is merge-patched into that ConfigMap with the
pod's service-account token over plain HTTPS (urllib; no kubernetes client in the worker).
Reporting never stops training: every failure is logged and training goes on. Writes are
throttled to one per ``min_interval_s`` except state changes and forced writes.
"""
from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.request
from datetime import datetime, timezone

from ..contract import PROGRESS_CONFIGMAP_ENV, PROGRESS_FILE, PROGRESS_KEY, Progress
from .storage import Location

log = logging.getLogger(__name__)
# Where the pod's service-account token and CA are; TUNESERVE_SERVICEACCOUNT_DIR overrides it for
# a worker run outside a pod (the demo runs the real worker against the local control plane).
SA_DIR = os.environ.get("TUNESERVE_SERVICEACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")


class ConfigMapSink:
    """Merge-patches one key of one ConfigMap through the in-cluster API endpoint."""

    def __init__(self, ref: str, *, sa_dir: str = SA_DIR, api: str | None = None,
                 timeout_s: float = 5.0):
        self.namespace, _, self.name = ref.partition("/")
        if not self.name:
            raise ValueError(f"{PROGRESS_CONFIGMAP_ENV} must be '<namespace>/<name>', got {ref!r}")
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api = api or f"https://{host}:{port}"
        self.sa_dir, self.timeout_s = sa_dir, timeout_s

    def write(self, doc: str) -> None:
        with open(os.path.join(self.sa_dir, "token")) as f:
            token = f.read().strip()
        ctx = ssl.create_default_context(cafile=os.path.join(self.sa_dir, "ca.crt"))
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/configmaps/{self.name}"
        body = json.dumps({"data": {PROGRESS_KEY: doc}}).encode()
        req = urllib.request.Request(url, data=body, method="PATCH", headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=self.timeout_s) as resp:
            resp.read()


class Reporter:
    """Holds the current Progress and publishes it; ``update`` never raises."""

    def __init__(self, checkpoint_uri: str, *, configmap: str | None = None,
                 min_interval_s: float = 10.0, sink: ConfigMapSink | None = None):
        self.file = Location(checkpoint_uri).child(PROGRESS_FILE)
        self.progress = Progress()
        self.min_interval_s = min_interval_s
        self.sink = sink
        if sink is None and configmap:
            try:
                self.sink = ConfigMapSink(configmap)
            except ValueError as e:
                log.warning("progress ConfigMap disabled: %s", e)
        self._last = 0.0

    @classmethod
    def from_env(cls, checkpoint_uri: str) -> "Reporter":
        return cls(checkpoint_uri, configmap=os.environ.get(PROGRESS_CONFIGMAP_ENV),
                   min_interval_s=float(os.environ.get("TUNESERVE_PROGRESS_INTERVAL_S", "10")))

    def load_previous(self) -> Progress | None:
        try:
            if self.file.exists():
                return Progress.model_validate_json(self.file.read_bytes())
        except Exception as e:
            log.warning("could not read previous progress %s: %s", self.file.uri, e)
        return None

    def update(self, force: bool = False, **fields) -> None:
        state_changed = "state" in fields and fields["state"] != self.progress.state
        self.progress = self.progress.model_copy(update=fields)
        now = time.monotonic()
        if not (force or state_changed or now - self._last >= self.min_interval_s):
            return
        self._last = now
        self.progress.updated_at = datetime.now(timezone.utc)
        doc = self.progress.model_dump_json(exclude_none=True)
        try:
            self.file.write_bytes(doc.encode())
        except Exception as e:
            log.warning("progress: could not write %s: %s", self.file.uri, e)
        if self.sink is not None:
            try:
                self.sink.write(doc)
            except Exception as e:
                log.warning("progress: could not update ConfigMap %s/%s: %s",
                            self.sink.namespace, self.sink.name, e)
