"""Where bytes live: local paths, PVC mounts and object stores, all through fsspec.

URI forms accepted everywhere a config names a location:

* ``/abs/path`` or ``file:///abs/path`` -- the pod's filesystem.
* ``pvc://<claim>/<path>`` -- a PersistentVolumeClaim the operator mounts at
  ``/mnt/pvc/<claim>`` in every Ray pod, so it maps to ``/mnt/pvc/<claim>/<path>``. The root can
  be moved with ``TUNESERVE_PVC_ROOT`` (tests use a temp dir).
* ``s3://``, ``gs://`` and any other fsspec protocol -- credentials and endpoints come from the
  usual environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` or
  ``FSSPEC_S3_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``), which pods get from a Secret.
* ``hf://<org>/<name>`` -- models only, fetched with huggingface_hub (``HF_HUB_OFFLINE=1`` means
  "from the local HF cache only").

Object stores have no atomic rename; callers that need atomic publication write a marker last
(see checkpoint.py). Every failure to reach a URI is raised as ``StorageError`` naming it.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .. import contract
from .errors import StorageError

PVC_ROOT_ENV = contract.PVC_ROOT_ENV
DEFAULT_PVC_ROOT = contract.PVC_ROOT


def pvc_root() -> str:
    return os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)


def local_path(uri: str) -> str | None:
    """The filesystem path a URI maps to, or None when it lives in an object store."""
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://"):].strip("/")
        if not rest:
            raise StorageError(f"{uri}: a pvc:// URI needs a claim name (pvc://<claim>/<path>)")
        return os.path.join(pvc_root(), rest)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" not in uri:
        return os.path.abspath(uri)
    return None


class Location:
    """A URI plus the fsspec filesystem and path it resolves to."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if len(uri) > 1 else uri
        path = local_path(self.uri)
        try:
            if path is not None:
                self.fs, self.path = LocalFileSystem(), path
            else:
                self.fs, self.path = fsspec.core.url_to_fs(self.uri)
        except (ImportError, ValueError) as e:
            raise StorageError(f"{uri}: unsupported storage URI ({e})") from e

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def child(self, *names: str) -> "Location":
        return Location(posixpath.join(self.uri, *names))

    def _wrap(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri}: not found ({what})") from e
        except StorageError:
            raise
        except Exception as e:  # network, permission, auth: all name the URI
            raise StorageError(f"{self.uri}: cannot {what}: {type(e).__name__}: {e}") from e

    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)  # another process may have written or deleted it
        return self._wrap("check existence", self.fs.exists, self.path)

    def isdir(self) -> bool:
        return self._wrap("stat", self.fs.isdir, self.path)

    def ls(self) -> list[str]:
        """Names (not paths) of direct children; empty when the prefix does not exist."""
        if not self.exists():
            return []
        entries = self._wrap("list", self.fs.ls, self.path, detail=False)
        names = [posixpath.basename(str(e).rstrip("/")) for e in entries]
        return sorted(n for n in names if n)

    def read_bytes(self) -> bytes:
        return self._wrap("read", self.fs.cat_file, self.path)

    def write_bytes(self, data: bytes) -> None:
        """Whole-object write; on a local filesystem via temp file + rename so readers never
        see half a file."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return
        self._wrap("write", self.fs.pipe_file, self.path, data)

    def rm(self) -> None:
        if self.exists():
            self._wrap("delete", self.fs.rm, self.path, recursive=True)

    def upload_dir(self, src: str) -> None:
        """Copy a local directory's files under this location (one object per file)."""
        for rel in _walk(src):
            self.child(rel).upload_file(os.path.join(src, rel))

    def upload_file(self, src: str) -> None:
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            shutil.copyfile(src, self.path)
            return
        self._wrap("upload", self.fs.put_file, src, self.path)

    def download_dir(self, dst: str) -> None:
        """Copy every file under this location into a local directory."""
        if not self.exists():
            raise StorageError(f"{self.uri}: not found")
        if self.local:
            shutil.copytree(self.path, dst, dirs_exist_ok=True)
            return
        files = self._wrap("list", self.fs.find, self.path)
        for f in files:
            rel = posixpath.relpath(f, self.path)
            target = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self._wrap("download", self.fs.get_file, f, target)


def _walk(root: str) -> Iterator[str]:
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            yield os.path.relpath(os.path.join(dirpath, name), root)


def local_files(root: str) -> list[str]:
    return sorted(_walk(root))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(root: str) -> tuple[str, dict[str, dict]]:
    """(digest of the whole tree, {relpath: {sha256, size}}) -- the tree digest covers names and
    contents, so renaming or changing any file changes it."""
    files = {rel: {"sha256": sha256_file(os.path.join(root, rel)),
                   "size": os.path.getsize(os.path.join(root, rel))} for rel in local_files(root)}
    h = hashlib.sha256()
    for rel, meta in files.items():
        h.update(f"{rel}\0{meta['sha256']}\n".encode())
    return "sha256:" + h.hexdigest(), files


def cache_dir() -> Path:
    """Node-local scratch for downloaded models and checkpoints."""
    root = Path(os.environ.get("TUNESERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                "tuneserve-worker")))
    root.mkdir(parents=True, exist_ok=True)
    return root


def materialize_model(uri: str, revision: str | None) -> str:
    """A local directory holding the model: the path itself for local/PVC URIs, a snapshot for
    hf:// (honouring HF_HUB_OFFLINE), a cached download for object stores."""
    path = local_path(uri)
    if path is not None:
        if not os.path.isdir(path):
            raise StorageError(f"{uri}: model directory not found at {path}")
        return path
    if uri.startswith("hf://"):
        repo = uri[len("hf://"):].strip("/")
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(repo, revision=revision)
        except Exception as e:
            offline = " (HF_HUB_OFFLINE is set: only the local HF cache was tried)" \
                if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
            raise StorageError(f"{uri}: cannot fetch model{offline}: {type(e).__name__}: {e}") from e
    key = hashlib.sha256(f"{uri}@{revision}".encode()).hexdigest()[:16]
    dst = cache_dir() / "models" / key
    if (dst / ".complete").exists():
        return str(dst)
    tmp = Path(f"{dst}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    Location(uri).download_dir(str(tmp))
    (tmp / ".complete").write_text(uri)
    try:
        os.replace(tmp, dst)
    except OSError:  # another worker on this node published it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / ".complete").exists():
            raise
    return str(dst)
