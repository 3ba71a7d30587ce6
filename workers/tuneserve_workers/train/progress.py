"""Progress reporting through the channel documented in contract.py.

``progress.json`` goes beside the checkpoints (durable); when ``TUNESERVE_PROGRESS_CONFIGMAP``
("<namespace>/<name>") is set, the same document is merge-patched into that ConfigMap with the
pod's service-account token (kube.py, the workers' one in-cluster client).
Reporting never stops training: every failure is logged and training goes on. Writes are
throttled to one per ``min_interval_s`` except state changes and forced writes.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone

from .. import kube
from ..contract import PROGRESS_CONFIGMAP_ENV, PROGRESS_FILE, PROGRESS_KEY, Progress
from .storage import Location

log = logging.getLogger(__name__)


class ConfigMapSink(kube.ConfigMap):
    """Merge-patches ``progress.json`` of the progress ConfigMap (kube.py: token, CA, override)."""

    def __init__(self, ref: str, **kw):
        super().__init__(ref, what=PROGRESS_CONFIGMAP_ENV, **kw)

    def write(self, doc: str) -> None:
        self.patch_key(PROGRESS_KEY, doc)


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
