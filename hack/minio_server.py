"""A real MinIO server (built by hack/build-binaries.sh) for the worker tests, the real-node
tests and the demo. Loopback by default; the real node's pods reach it on the pod bridge's
address, which never leaves this machine."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from localcluster import ClusterError, wait_until

HACK = Path(__file__).resolve().parent
ACCESS_KEY, SECRET_KEY = "tuneserve", "tuneserve-secret"


def minio_binary() -> Path:
    """TUNESERVE_MINIO, else the cached build of the pinned version."""
    if os.environ.get("TUNESERVE_MINIO"):
        return Path(os.environ["TUNESERVE_MINIO"])
    versions = dict(line.split("=", 1) for line in (HACK / "versions.env").read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    cache = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve")) / "bin"
    return cache / f"minio-{versions['MINIO_VERSION'].strip()}" / "minio"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class MinioServer:
    data_dir: Path
    host: str = "127.0.0.1"
    bucket: str = "tuneserve-test"
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    port: int = 0
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a pod gets from a Secret: the standard AWS variables plus the endpoint."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> "MinioServer":
        binary = minio_binary()
        if not binary.exists():
            raise RuntimeError(f"MinIO binary not found at {binary}: run hack/build-binaries.sh (make binaries)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port(self.host)
        env = dict(os.environ, MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key,
                   MINIO_BROWSER="off", MINIO_UPDATE="off")
        log = open(self.data_dir.parent / f"minio-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [str(binary), "server", str(self.data_dir), "--address", f"{self.host}:{self.port}",
             "--console-address", f"127.0.0.1:{_free_port('127.0.0.1')}", "--quiet"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            self._wait_ready(timeout, log.name)
            self.filesystem().mkdir(self.bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float, log_name: str) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise ClusterError(f"MinIO exited with {self.proc.returncode}; see {log_name}")
            with opener.open(f"{self.endpoint}/minio/health/ready", timeout=1) as resp:
                return resp.status == 200

        try:
            wait_until(ready, timeout, f"MinIO at {self.endpoint}")
        except ClusterError as exc:
            raise RuntimeError(str(exc)) from exc

    def filesystem(self):
        import s3fs
        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def upload(self, local: Path, key: str) -> str:
        """Copies a file or directory to s3://<bucket>/<key>; returns that URI."""
        fs = self.filesystem()
        fs.put(str(local), f"{self.bucket}/{key}", recursive=local.is_dir())
        return f"s3://{self.bucket}/{key}"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
