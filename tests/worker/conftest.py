"""Fixtures for the training worker tests: a real MinIO on loopback, one shared Ray instance,
a tiny model built locally (helpers for running the entrypoint are in worker_helpers.py).

Nothing here downloads anything: HF_HUB_OFFLINE=1 everywhere, the model is built from a config.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from worker_helpers import PYTHONPATH, REPO, free_port, wait_for

sys.path.insert(0, str(REPO / "hack"))
from minio_server import MinioServer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read by Ray at import time, so set before anything imports it; inherited by every subprocess.
# Keeps Ray's addresses on 127.0.0.1 (otherwise "127.0.0.1" is rewritten to the external IP).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Our test cluster listens on loopback only; token auth across separately started processes
# sharing ~/.ray/auth_token with other Ray users of this box was flaky.
os.environ["RAY_AUTH_MODE"] = "disabled"


# ----------------------------------------------------------------------------------- MinIO

def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def minio(tmp_path_factory):
    """A real MinIO on loopback with the test bucket (hack/minio_server.py)."""
    server = MinioServer(tmp_path_factory.mktemp("minio") / "data")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(minio, monkeypatch):
    """This process talks to MinIO through the same environment variables a pod would use."""
    for k, v in minio.env().items():
        monkeypatch.setenv(k, v)
    import fsspec
    fsspec.config.conf.clear()
    fsspec.config.set_conf_env(fsspec.config.conf)
    from s3fs import S3FileSystem
    S3FileSystem.clear_instance_cache()
    yield minio
    fsspec.config.conf.clear()
    S3FileSystem.clear_instance_cache()


# ------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_address(tmp_path_factory, request):
    """One small Ray instance per test module, on loopback; entrypoints join it via RAY_ADDRESS.

    Started with ``ray start --head --block`` as our own child process (the Ray processes die
    with it; no dependence on Ray state other tests left in this process) in a private temp dir
    (so ``ray.init()`` elsewhere on this machine never discovers it); this process also
    connects, to watch resources. A module sets ``RAY_CPUS`` for more logical CPUs than the
    default 2 (one per training process; the processes then share the machine's cores)."""
    import ray
    port = free_port()
    tmp = tmp_path_factory.mktemp("ray")
    temp_dir = tempfile.mkdtemp(prefix="tsray-")     # short: Ray puts unix sockets under it
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1")
    log = open(tmp / "ray-start.log", "wb")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--num-cpus={getattr(request.module, 'RAY_CPUS', 2)}", f"--object-store-memory={256 * 2**20}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        def up():
            if head.poll() is not None:
                raise AssertionError(f"ray start exited with {head.returncode}; see {log.name}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, 90, "the Ray head's GCS port")
        ray.init(address=address, _node_ip_address="127.0.0.1", configure_logging=False,
                 log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        _stop(head, 30)
        log.close()

        def removed():   # Ray's last processes may still be writing logs for a moment
            shutil.rmtree(temp_dir, ignore_errors=True)
            return not os.path.exists(temp_dir)
        try:
            wait_for(removed, 15, f"{temp_dir} to be removed")
        except AssertionError as e:
            print(e, file=sys.stderr)


# ------------------------------------------------------------------------------ tiny model

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tuneserve_workers.testing.tiny import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict:
    """The tiny model and two adapters trained on it (serve_helpers.build_artifacts), shared by
    every serve test of the session."""
    from serve_helpers import build_artifacts, code_digest
    cache = os.environ.get("TUNESERVE_SERVE_TEST_CACHE")
    root = Path(cache) / code_digest() if cache else tmp_path_factory.mktemp("serve-artifacts")
    return build_artifacts(root)
