"""The serve replica's engine on CPU (real vLLM, the tiny model and trained adapters): the dtype it
runs in, bfloat16 forced, and an engine whose worker dies at start-up reported with its cause.

Each test runs one replica (``replica_process.py``: ReplicaServer under uvicorn) in a process
group of its own, removed afterwards whatever happens.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from serve_helpers import ANSWERS, PYTHONPATH, ask, http, wait_for
from worker_helpers import cpu_flags, free_port

pytestmark = pytest.mark.worker
HERE = Path(__file__).parent
REPORT = "replica.test-replica.json"


@dataclass
class Replica:
    proc: subprocess.Popen
    url: str
    status_dir: Path
    log: Path

    def report(self) -> dict | None:
        try:
            return json.loads((self.status_dir / REPORT).read_text())
        except (OSError, ValueError):
            return None

    def settled(self) -> dict | None:
        """The report once the replica is Ready or Failed."""
        rep = self.report()
        return rep if rep and rep["state"] in ("Ready", "Failed") else None

    def engine_processes(self) -> list[psutil.Process]:
        """vLLM's processes in the replica's process group (they outlive a dead replica there)."""
        found = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid and _title(p).startswith("VLLM::"):
                    found.append(p)
            except (OSError, psutil.Error):
                continue
        return found


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@pytest.fixture
def replica(tmp_path):
    """Starts replicas for a test; stops every one (its whole process group) afterwards."""
    started: list[Replica] = []

    def start(cfg: dict) -> Replica:
        status_dir = tmp_path / "status"
        cfg_path, log = tmp_path / "serve.json", tmp_path / "replica.log"
        cfg_path.write_text(json.dumps(cfg))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PYTHONPATH, str(HERE)]), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1",
                   TUNESERVE_ADAPTER_POLL_S="1", TUNESERVE_SERVE_STATUS_DIR=str(status_dir), PYTHONUNBUFFERED="1")
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(HERE / "replica_process.py"), str(cfg_path), str(port)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(Replica(proc, f"http://127.0.0.1:{port}", status_dir, log))
        return started[-1]

    yield start
    for r in started:
        if r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGTERM)
            try:
                r.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
        wait_for(lambda: not r.engine_processes(), 30, "the replica's engine processes to exit")


def config(artifacts: dict, tmp_path: Path, dtype: str) -> dict:
    adapters = tmp_path / "adapters.json"
    adapters.write_text(json.dumps([{"name": n, "uri": artifacts[n]} for n in ANSWERS]))
    return {"served_model_name": "tiny", "base_model": {"uri": artifacts["model"]}, "max_loras": 2,
            "max_lora_rank": 8, "device": "cpu", "dtype": dtype, "adapters_file": str(adapters),
            "extra_engine_args": {"max_model_len": "256", "max_num_seqs": "8"}}


def test_bfloat16_set_explicitly_serves_the_adapters(artifacts, replica, tmp_path):
    """engine.dtype bfloat16 on CPU. On CPUs without AMX (AVX512-BF16 or AVX2) vLLM 0.32 serves it.
    On AMX CPUs its bf16 attention kernel can kill the worker with SIGILL (docs/serving.md); there
    the replica must either serve or report that death with its cause, never hang or stay mute."""
    r = replica(config(artifacts, tmp_path, "bfloat16"))
    rep = wait_for(r.settled, 300, "the replica to be Ready or Failed", interval=1)
    if rep["state"] == "Failed" and "amx_bf16" in cpu_flags():
        assert rep["message"].startswith("engine failed to start: "), rep
        assert "died" in rep["message"] or "Error" in rep["message"], rep
        wait_for(lambda: r.proc.poll() == 3, 60, "the failed replica to exit")
        return
    assert rep["state"] == "Ready", (rep, r.log.read_text()[-3000:])
    assert rep["dtype"] == "bfloat16"
    code, status, _ = http(f"{r.url}/tuneserve/status")
    assert code == 200 and status["dtype"] == "bfloat16", status
    for name, answer in ANSWERS.items():
        assert ask(r.url, name)[:2] == (200, answer)


def kill_worker_once_python_runs(r: Replica, sig: int) -> threading.Thread:
    """Sends ``sig`` to the engine's first worker as soon as its interpreter has loaded torch
    (so Python's faulthandler is installed in it). Runs beside the replica's start-up."""
    def loaded_torch(p: psutil.Process) -> bool:
        try:
            return any("libtorch_cpu" in m.path for m in p.memory_maps())
        except psutil.Error:
            return False

    def kill():
        def worker():
            return next((p for p in r.engine_processes() if "VLLM::Worker" in _title(p) and loaded_torch(p)), None)
        wait_for(worker, 240, "the engine's worker process", interval=0.1).send_signal(sig)
    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_worker_killed_at_start_up_is_a_failed_report_naming_the_signal(artifacts, replica, tmp_path):
    """What the issue saw on AMX machines (a worker dying of SIGILL), made to happen on every CPU:
    the replica reports Failed with the signal, exits, and leaves no engine process behind."""
    r = replica(config(artifacts, tmp_path, "float32"))
    killer = kill_worker_once_python_runs(r, signal.SIGILL)
    rep = wait_for(r.settled, 300, "the replica to be Ready or Failed", interval=0.5)
    killer.join(5)
    assert rep["state"] == "Failed", (rep, r.log.read_text()[-3000:])
    message = rep["message"]
    assert message.startswith("engine failed to start: "), message
    assert "Fatal Python error: Illegal instruction (SIGILL)" in message, message
    wait_for(lambda: r.proc.poll() == 3, 60, "the failed replica to exit")
    assert "replica failed: engine failed to start" in r.log.read_text()
    wait_for(lambda: not r.engine_processes(), 30, "the engine processes to be gone")
