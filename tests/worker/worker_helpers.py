"""Helpers for the worker tests (imported by conftest.py and the test modules)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(REPO / "workers"), str(REPO / "operator")])


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo), read independently of
    torch's probes so tests can check the worker's own detection against them."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_cpu_bf16() -> tuple[bool, str]:
    """(native, via) as the worker should detect them: AMX-BF16 or AVX512-BF16 is native bf16."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX-BF16"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    return False, "none"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_config(tmp: Path, *, model: str, dataset: str, checkpoint: str | None = None,
               output: str | None = None, **training) -> dict:
    """A small 2-worker CPU job over the toy task."""
    t = {"max_steps": 40, "learning_rate": 5e-3, "warmup_ratio": 0.05, "global_batch_size": 4,
         "micro_batch_size": 1, "max_seq_length": 64, "packing": True, "seed": 7}
    ckpt = {"interval_steps": 10, "interval_minutes": None, "keep": 2}
    ckpt.update(training.pop("ckpt", {}))
    t.update(training)
    return {"job_name": "tiny", "namespace": "test",
            "base_model": {"uri": model},
            "dataset": {"uri": dataset, "format": "chat", "validation_split": 0.125},
            "adapter": {"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0,
                        "target_modules": ["all-linear"]},
            "training": t,
            "checkpoint": {"uri": checkpoint or str(tmp / "ckpt"), **ckpt},
            "output_uri": output or str(tmp / "out"),
            "accelerator": {"workers": 2, "torch_device": "cpu", "distributed_backend": "gloo"}}


def entrypoint_env(ray_address: str | None, tmp: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, HF_HUB_OFFLINE="1",
               TUNESERVE_PROGRESS_INTERVAL_S="0", TUNESERVE_CACHE=str(tmp / "cache"),
               TUNESERVE_RAY_STORAGE=str(tmp / "ray-storage"), PYTHONUNBUFFERED="1",
               TUNESERVE_FORWARD_ENV="1")    # our test Ray cluster was started without them
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    else:
        env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


def start_entrypoint(cfg: dict, tmp: Path, env: dict, name: str = "run") -> subprocess.Popen:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "tuneserve_workers.train", "--config", str(path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp))


def run_entrypoint(cfg: dict, tmp: Path, env: dict, name: str = "run", timeout: float = 240):
    """Run to completion; returns (exit code, log text)."""
    proc = start_entrypoint(cfg, tmp, env, name)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"entrypoint {name} did not finish in {timeout}s:\n"
                             + (tmp / f"{name}.log").read_text()[-4000:])
    return rc, (tmp / f"{name}.log").read_text()
