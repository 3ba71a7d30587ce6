"""Per-replica status report for the operator: a ``ServeReplicaReport`` (contract.py) written under
key ``replica_report_key(replica_id)`` of the ConfigMap ``ServeAppConfig.status_configmap``
(a merge patch of that one key through kube.py, so replicas never conflict), on every adapter
state change and every ``SERVE_HEARTBEAT_SECONDS`` (the operator ignores reports older than
``SERVE_REPORT_STALE_SECONDS``: a dead replica ages out).

``TUNESERVE_SERVE_STATUS_DIR`` additionally (or, outside Kubernetes, only) writes the same
documents as files ``<dir>/<key>``; the tests read those. Publishing never raises.
"""
from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from typing import Callable, Optional

from .. import contract, kube

log = logging.getLogger("tuneserve.serve.report")
STATUS_DIR_ENV = "TUNESERVE_SERVE_STATUS_DIR"


class ConfigMapKeySink(kube.ConfigMap):
    """Writes the replica's key of the status ConfigMap (a merge patch of that one key)."""

    def write(self, key: str, doc: str) -> None:
        self.patch_key(key, doc)


class ConfigMapKeySource(kube.ConfigMap):
    """Reads one key of a ConfigMap: the desired adapter set as the operator just wrote it, seconds
    earlier than the kubelet refreshes the mounted copy (up to a minute or more)."""

    def __init__(self, ref: str, key: str, **kw):
        super().__init__(ref, **kw)
        self.key = key

    def read(self) -> bytes:
        return self.get_key(self.key)


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
    """The ServeReplicaReport JSON (contract.py)."""
    adapters = {}
    if reconciler is not None:
        for st in reconciler.adapters.values():
            adapters[st.name] = {"state": st.state, "uri": st.uri, "message": st.message}
    doc = {"contract_version": contract.CONTRACT_VERSION, "replica_id": replica_id, "state": state,
           "adapters": adapters,
           "adapters_digest": reconciler.file_digest if reconciler is not None else None,
           "adapters_error": reconciler.file_error if reconciler is not None else None,
           "dtype": dtype, "message": message, "updated_at": datetime.now(timezone.utc).isoformat()}
    return contract.ServeReplicaReport.model_validate(doc).model_dump_json()


class StatusPublisher:
    def __init__(self, replica_id: str, snapshot: Callable[[], str], *,
                 configmap: Optional[str] = None):
        self.replica_id = replica_id
        self.snapshot = snapshot
        self.key = contract.replica_report_key(replica_id)
        self.interval = float(contract.SERVE_HEARTBEAT_SECONDS)
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
