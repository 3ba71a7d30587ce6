"""Checkpoints at ``checkpoint.uri``: atomic publication, digests, keep-last-K, newest-good lookup.

Layout under the checkpoint URI::

    step-000000040/            one checkpoint (adapter/, state.pt, ...)
    step-000000040/COMMITTED   JSON: step, time, per-file sha256+size, tree digest. Written last.
    progress.json              the progress document (progress.py)

Publication: the checkpoint is first written to a local temp dir and digested. On a filesystem
(local path, PVC) it is copied to ``.tmp-step-...`` beside the others, the marker written, and the
directory renamed into place (atomic). On an object store, where rename is a copy, the files are
uploaded to their final prefix and ``COMMITTED`` is uploaded last; a reader that sees the marker
sees every file. Either way a checkpoint counts only if its marker parses and every file matches
its digest, so a truncated or half-uploaded newest checkpoint is skipped for the previous one.

The store publishes and finds checkpoint directories without looking inside their files; the
format of ``state.pt`` (counters, optimizer, scheduler, RNG) is its sibling state.py.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from .errors import StorageError
from .storage import Location, dir_digest

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
_NAME = re.compile(r"^step-(\d{9})$")


def step_name(step: int) -> str:
    return f"step-{step:09d}"


@dataclass
class Committed:
    step: int
    uri: str
    time: datetime
    marker: dict


class CheckpointStore:
    def __init__(self, uri: str, keep: int = 3):
        self.root = Location(uri)
        self.keep = max(1, keep)

    def _marker(self, name: str) -> dict | None:
        loc = self.root.child(name, MARKER)
        try:
            if not loc.exists():
                return None
            m = json.loads(loc.read_bytes())
            return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
        except (StorageError, ValueError) as e:
            log.warning("checkpoint %s: unreadable marker (%s); ignoring it", name, e)
            return None

    def committed(self) -> list[Committed]:
        """Checkpoints with a parseable marker, newest first (digests not yet checked)."""
        out = []
        for name in self.root.ls():
            m = _NAME.match(name)
            if not m:
                continue
            marker = self._marker(name)
            if marker is None or marker.get("step") != int(m.group(1)):
                continue
            out.append(Committed(int(m.group(1)), self.root.child(name).uri,
                                 datetime.fromisoformat(marker["time"]), marker))
        return sorted(out, key=lambda c: c.step, reverse=True)

    def save(self, step: int, src: str, meta: dict | None = None) -> Committed:
        """Publish the local directory ``src`` as the checkpoint for ``step``, then prune."""
        digest, files = dir_digest(src)
        now = datetime.now(timezone.utc)
        marker = {"step": step, "time": now.isoformat(), "digest": digest, "files": files,
                  "meta": meta or {}}
        data = json.dumps(marker, indent=1).encode()
        name = step_name(step)
        final = self.root.child(name)
        if self.root.local:
            tmp = self.root.child(f".tmp-{name}-{uuid.uuid4().hex[:8]}")
            shutil.copytree(src, tmp.path)
            with open(os.path.join(tmp.path, MARKER), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final.path):        # a rerun re-saving the same step
                shutil.rmtree(final.path)
            os.rename(tmp.path, final.path)
        else:
            self.root.child(name, MARKER).rm()    # never leave an old marker over new files
            final.upload_dir(src)
            self.root.child(name, MARKER).write_bytes(data)
        self.prune()
        return Committed(step, final.uri, now, marker)

    def prune(self) -> None:
        """Keep the newest ``keep`` committed checkpoints; drop older ones and leftovers of
        interrupted writes. Markers go first so a half-deleted checkpoint is never 'good'."""
        good = self.committed()
        keep = {step_name(c.step) for c in good[:self.keep]}
        newest = good[0].step if good else None
        for name in self.root.ls():
            m = _NAME.match(name)
            stale_tmp = name.startswith(".tmp-step-")
            old = m and name not in keep and (newest is None or int(m.group(1)) < newest)
            if not (stale_tmp or old):
                continue
            try:
                self.root.child(name, MARKER).rm()
                self.root.child(name).rm()
            except StorageError as e:
                log.warning("could not prune checkpoint %s: %s", name, e)

    def fetch(self, c: Committed, dst: str) -> bool:
        """Download checkpoint ``c`` into ``dst`` and verify every digest; False when corrupt."""
        shutil.rmtree(dst, ignore_errors=True)
        try:
            Location(c.uri).download_dir(dst)
        except StorageError as e:
            log.warning("checkpoint step %d unreadable: %s", c.step, e)
            return False
        os.remove(os.path.join(dst, MARKER))
        digest, files = dir_digest(dst)
        if digest != c.marker.get("digest") or files != c.marker["files"]:
            bad = sorted(k for k in set(files) | set(c.marker["files"])
                         if files.get(k) != c.marker["files"].get(k))
            log.warning("checkpoint step %d is corrupt (mismatched: %s); skipping it", c.step, bad)
            return False
        return True

    def latest_good(self, dst: str) -> Committed | None:
        """The newest checkpoint whose files all match their digests, downloaded into ``dst``."""
        for c in self.committed():
            if self.fetch(c, dst):
                return c
        return None


def scratch_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)
