"""Keep a replica's loaded LoRA set equal to the desired set, adapter by adapter.

The desired set is a JSON file (the operator mounts ConfigMap ``<ms>-adapters`` there; kubelet
swaps the file in place, the pod is not restarted). Accepted shapes: ``{"adapters": [{"name",
"uri"}, ...]}`` or a bare list of those objects. Each replica polls the file (read + sha256 of a
few hundred bytes every ``interval`` seconds) and reconciles:

- desired, not loaded (or its URI changed) -> validate, then load through the engine
  (``Loader.load``); state ``Loading`` -> ``Loaded`` or ``Failed`` with a message;
- loaded, no longer desired -> unload (``Loader.unload``) and forget it;
- a ``Failed`` adapter is retried after ``retry_after`` seconds (storage may come back) or as
  soon as its entry in the file changes. A retry keeps reporting ``Failed`` with the last message
  until it succeeds, so the status does not flap through ``Loading`` every ``retry_after``.
  Failures never touch the other adapters.

Validation before the engine sees an adapter: the directory exists and holds
``adapter_config.json``; its rank (``r`` and any ``rank_pattern`` value) is at most the engine's
``max_lora_rank``; and when a ``tuneserve-manifest.json`` (AdapterManifest) sits beside it, its
``base_model.uri`` (and revision, when both sides set one) names this server's base model.

A file that cannot be read or parsed keeps the current set (a half-written file must not unload
everything) and is reported in ``file_error``. This module has no vLLM or Ray imports: the loader is
injected, so the reconciler is unit-testable on its own.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

from ..contract import MANIFEST_FILE, AdapterManifest, ModelSource, ServeAdapter

log = logging.getLogger("tuneserve.serve.adapters")

LOADING, LOADED, FAILED = "Loading", "Loaded", "Failed"


class AdapterError(Exception):
    """An adapter that cannot be served; the message goes to its status."""


class Loader(Protocol):
    async def load(self, name: str, path: str) -> None: ...
    async def unload(self, name: str) -> None: ...


@dataclass
class AdapterState:
    name: str
    uri: str
    state: str = LOADING
    message: Optional[str] = None
    path: Optional[str] = None
    rank: Optional[int] = None
    since: float = field(default_factory=time.time)
    attempted_at: float = 0.0

    def public(self) -> dict:
        return {"name": self.name, "uri": self.uri, "state": self.state, "message": self.message,
                "rank": self.rank, "since": self.since}


def parse_desired(raw: bytes) -> list[ServeAdapter]:
    doc = json.loads(raw.decode() or "[]")
    items = doc.get("adapters", []) if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ValueError("expected a list of adapters or {\"adapters\": [...]}")
    adapters = [ServeAdapter.model_validate(a) for a in items]
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate adapter names: {', '.join(dupes)}")
    return adapters


def _norm_uri(uri: str) -> str:
    uri = uri.strip()
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        uri = os.path.realpath(uri)
    return uri.rstrip("/")


def same_model(a: ModelSource, b: ModelSource) -> bool:
    if _norm_uri(a.uri) != _norm_uri(b.uri):
        return False
    return not (a.revision and b.revision and a.revision != b.revision)


def adapter_rank(config: dict) -> int:
    ranks = [int(config.get("r", 0) or 0)]
    ranks += [int(v) for v in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def materialize(uri: str) -> str:
    """A local directory for an adapter URI (local path, pvc://, file://, or object store)."""
    from ..train.storage import local_path, materialize_model
    path = local_path(uri)
    if path is not None:
        if not os.path.isdir(path):
            raise AdapterError(f"adapter directory not found: {path}")
        return path
    try:
        return materialize_model(uri, None)
    except Exception as e:
        raise AdapterError(f"cannot fetch adapter: {e}") from e


def validate(uri: str, base: ModelSource, max_rank: int) -> tuple[str, int]:
    """(local path, rank) of a servable adapter, or AdapterError saying why not."""
    path = materialize(uri)
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"no adapter_config.json in {path}")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"unreadable adapter_config.json: {e}") from e
    rank = adapter_rank(config)
    if rank > max_rank:
        raise AdapterError(f"adapter rank {rank} exceeds the engine's max_lora_rank {max_rank}")
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = AdapterManifest.model_validate_json(f.read())
        except (OSError, ValueError) as e:
            raise AdapterError(f"unreadable {MANIFEST_FILE}: {e}") from e
        if not same_model(manifest.base_model, base):
            raise AdapterError(f"adapter was trained on base model {manifest.base_model.uri!r}, "
                               f"this server serves {base.uri!r}")
    return path, rank


class AdapterReconciler:
    """Desired set (file or static list) -> loaded set, one replica's view."""

    def __init__(self, loader: Loader, *, base: ModelSource, max_rank: int,
                 adapters_file: Optional[str] = None, initial: list[ServeAdapter] = (),
                 interval: float = 2.0, retry_after: float = 30.0, on_change=None,
                 source=None):
        self.loader = loader
        self.base = base
        self.max_rank = max_rank
        self.adapters_file = adapters_file
        # Where the desired set is read: the ConfigMap through the API when given (fresh within a
        # poll), else the mounted file; the file is also the fallback when the API cannot answer.
        self.source = source
        self.interval = interval
        self.retry_after = retry_after
        self.on_change = on_change or (lambda: None)
        self.static = list(initial)
        self.adapters: dict[str, AdapterState] = {}
        self.file_digest: Optional[str] = None
        self.file_error: Optional[str] = None
        self.synced_at: Optional[float] = None
        self._desired: Optional[list[ServeAdapter]] = None
        self._lock = asyncio.Lock()
        self._task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ desired set
    def read_desired(self) -> list[ServeAdapter]:
        """The desired set; the last good one when the file cannot be read right now."""
        if not self.adapters_file and self.source is None:
            return self.static
        try:
            raw = self._read_raw()
        except FileNotFoundError:
            # Not mounted yet / no adapters: fall back to the config's list until it appears.
            if self._desired is None:
                self.file_error = f"{self.adapters_file}: not found; using the config's adapters"
                return self.static
            self.file_error = f"{self.adapters_file}: not found; keeping the last good set"
            return self._desired
        except OSError as e:
            self.file_error = f"{self.adapters_file}: {e}; keeping the last good set"
            return self._desired if self._desired is not None else self.static
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self.file_digest and self._desired is not None:
            return self._desired
        try:
            desired = parse_desired(raw)
        except Exception as e:
            self.file_error = f"{self.adapters_file}: {e}; keeping the last good set"
            log.warning("%s", self.file_error)
            return self._desired if self._desired is not None else self.static
        self.file_digest, self._desired, self.file_error = digest, desired, None
        return desired

    def _read_raw(self) -> bytes:
        if self.source is not None:
            try:
                return self.source.read()
            except Exception as e:  # noqa: BLE001 -- the API is down or forbids: use the mount
                log.warning("reading the desired adapters through the API failed (%s); using %s", e,
                            self.adapters_file)
                if not self.adapters_file:
                    raise OSError(str(e)) from e
        with open(self.adapters_file, "rb") as f:
            return f.read()

    # ------------------------------------------------------------------- reconcile
    async def sync(self) -> bool:
        """One pass; True when anything changed."""
        async with self._lock:
            desired = {a.name: a.uri for a in self.read_desired()}
            changed = False
            for name in [n for n in self.adapters if n not in desired]:
                st = self.adapters.pop(name)
                changed = True
                if st.state == LOADED:
                    try:
                        await self.loader.unload(name)
                        log.info("unloaded adapter %s", name)
                    except Exception as e:  # gone from the table either way; log it
                        log.warning("unloading adapter %s: %s", name, e)
            now = time.time()
            todo = []
            for name, uri in desired.items():
                st = self.adapters.get(name)
                if st is None or st.uri != uri:
                    if st is not None and st.state == LOADED:
                        # New weights under the same name: never serve a mix; unload, then load.
                        try:
                            await self.loader.unload(name)
                        except Exception as e:
                            log.warning("unloading adapter %s for a new URI: %s", name, e)
                    self.adapters[name] = AdapterState(name, uri)
                    todo.append(name)
                elif st.state == FAILED and now - st.attempted_at >= self.retry_after:
                    todo.append(name)
            if todo:
                changed = True
                self.on_change()
            for name in todo:
                await self._load(self.adapters[name])
            self.synced_at = time.time()
            if changed:
                self.on_change()
            return changed

    async def _load(self, st: AdapterState) -> None:
        retry = st.state == FAILED
        st.attempted_at = time.time()
        if not retry:
            st.state, st.message, st.since = LOADING, None, st.attempted_at
        try:
            path, rank = await asyncio.to_thread(validate, st.uri, self.base, self.max_rank)
            st.path, st.rank = path, rank
            await self.loader.load(st.name, path)
        except AdapterError as e:
            self._settle(st, FAILED, str(e))
        except Exception as e:  # engine errors: keep the message, keep going
            self._settle(st, FAILED, f"{type(e).__name__}: {e}")
        else:
            self._settle(st, LOADED, None)
        (log.info if st.state == LOADED else log.warning)(
            "adapter %s (%s): %s%s", st.name, st.uri, st.state,
            f": {st.message}" if st.message else "")

    @staticmethod
    def _settle(st: AdapterState, state: str, message: Optional[str]) -> None:
        """The outcome of a load; ``since`` moves only when the state does."""
        if state != st.state:
            st.since = time.time()
        st.state, st.message = state, message

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:
                log.exception("adapter sync failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # ---------------------------------------------------------------------- views
    def counts(self) -> dict[str, int]:
        out = {LOADING: 0, LOADED: 0, FAILED: 0}
        for st in self.adapters.values():
            out[st.state] += 1
        return out

    def public(self) -> list[dict]:
        return [st.public() for st in sorted(self.adapters.values(), key=lambda s: s.name)]
