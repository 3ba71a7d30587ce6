"""Per-replica status report for the operator: a ``ServeReplicaReport`` (contract.py) written under
key ``replica_report_key(replica_id)`` of the ConfigMap ``ServeAppConfig.status_configmap``
(a merge patch of that one key through kube.py, so replicas never conflict), on every adapter
state change and every ``SERVE_HEARTBEAT_SECONDS`` (the operator ignores reports older than
``SERVE_REPORT_STALE_SECONDS``: a dead replica ages out).

Pruning: replicas come and go (restarts, scaling), each under a new id, so the ConfigMap would
grow with every replica ever started. Every ``PRUNE_INTERVAL_SECONDS`` each replica deletes the
reports whose ``updated_at`` is older than ``PRUNE_AFTER_SECONDS`` (no live replica's: a live one
rewrites its report every heartbeat), in one merge patch guarded by the resourceVersion it read,
re-read and retried on a conflict, so a report refreshed meanwhile is never deleted.

``TUNESERVE_SERVE_STATUS_DIR`` additionally (or, outside Kubernetes, only) writes the same
documents as files ``<dir>/<key>``; the tests read those. Publishing never raises.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Callable, Optional

from .. import contract, kube

log = logging.getLogger("tuneserve.serve.report")
STATUS_DIR_ENV = "TUNESERVE_SERVE_STATUS_DIR"
PRUNE_AFTER_SECONDS = 2 * contract.SERVE_FAILURE_REPORT_SECONDS
"""Twice the longest the operator reads any report (a failed replica's last one): nothing it still
shows is pruned, and replicas whose clocks differ by minutes do not prune each other's reports."""
PRUNE_INTERVAL_SECONDS = 300.0
PRUNE_ATTEMPTS = 5


def stale_report_keys(data: dict[str, str], now: datetime,
                      after_s: float = PRUNE_AFTER_SECONDS) -> list[str]:
    """Report keys whose ``updated_at`` is older than ``after_s``; keys that are not reports, or
    whose time cannot be read (another contract version), are kept."""
    stale = []
    for key, doc in sorted(data.items()):
        if not key.startswith(contract.SERVE_STATUS_KEY_PREFIX):
            continue
        try:
            updated = datetime.fromisoformat(json.loads(doc)["updated_at"])
        except (ValueError, TypeError, KeyError):
            continue
        if updated.tzinfo is not None and (now - updated).total_seconds() > after_s:
            stale.append(key)
    return stale


def prune_stale_reports(cm: kube.ConfigMap, now: Callable[[], datetime],
                        after_s: float = PRUNE_AFTER_SECONDS, attempts: int = PRUNE_ATTEMPTS) -> list[str]:
    """Delete the stale reports of ``cm`` atomically: planned from one read, written only if
    nothing changed since (resourceVersion), re-planned on a conflict. Returns the keys deleted."""
    for _ in range(attempts):
        data, version = cm.read()
        stale = stale_report_keys(data, now(), after_s)
        if not stale:
            return []
        try:
            cm.patch({key: None for key in stale}, resource_version=version)
            return stale
        except kube.Conflict:
            continue
    log.info("pruning %s/%s: %d conflicts in a row; next time", cm.namespace, cm.name, attempts)
    return []


class ConfigMapKeySink(kube.ConfigMap):
    """Writes the replica's key of the status ConfigMap (a merge patch of that one key)."""

    def write(self, key: str, doc: str) -> None:
        self.patch_key(key, doc)

    def prune(self) -> list[str]:
        return prune_stale_reports(self, lambda: datetime.now(timezone.utc))


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
        self._pruned_at: Optional[float] = None

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
        self._prune_when_due()

    def _prune_when_due(self) -> None:
        """Prune stale reports at most every PRUNE_INTERVAL_SECONDS (first after one interval)."""
        now = time.monotonic()
        if self._pruned_at is None:
            self._pruned_at = now
        if now - self._pruned_at < PRUNE_INTERVAL_SECONDS:
            return
        self._pruned_at = now
        for sink in self.sinks:
            try:
                deleted = sink.prune() if hasattr(sink, "prune") else []
                if deleted:
                    log.info("pruned %d stale replica reports: %s", len(deleted), ", ".join(deleted))
            except Exception as e:
                log.warning("pruning stale reports via %s failed: %s", type(sink).__name__, e)

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
