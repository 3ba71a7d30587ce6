"""The tuneserve operator as a real process against the local control plane (as it runs in a pod)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from localcluster import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]


class OperatorProcess:
    def __init__(self, kubeconfig: Path, log_dir: Path, env: dict[str, str] | None = None):
        self.kubeconfig, self.log_dir = kubeconfig, log_dir
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "TUNESERVE_HEALTH_ADDR": f"127.0.0.1:{self.port}",   # the default resync (60 s), as the chart
               "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'workers'}", **self.extra_env}
        log = open(self.log_dir / "tuneserve-operator.log", "ab")
        log.write(f"\n===== start #{self.starts} =====\n".encode())
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneserve.main"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}: {self.log_tail()}")
            with opener.open(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                return resp.status == 200

        wait_until(healthy, timeout, "the tuneserve operator's /healthz", on_timeout=self.log_tail)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        path = self.log_dir / "tuneserve-operator.log"
        return "\n--- operator log ---\n" + path.read_text(errors="replace")[-n:] if path.exists() else ""
