"""Graceful drain end to end: SIGTERM to one Ray train worker process mid-run (what a pod deletion
or a spot preemption does through the pods' preStop hook) stops every rank after the step in
flight, on an emergency checkpoint of exactly that step, committed and newest; the entrypoint exits
3 (drained), and the resubmitted run resumes at that step: 0 steps lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker_helpers import (PYTHONPATH, STEPS, entrypoint_env, job_config, progress_at, run_entrypoint,
                            start_entrypoint, wait_for)
from tuneserve_workers.contract import MANIFEST_FILE, AdapterManifest
from tuneserve_workers.train.checkpoint import CheckpointStore
from tuneserve_workers.train.drain import DRAINED_EXIT_CODE
from tuneserve_workers.testing.tiny import write_toy_dataset

pytestmark = pytest.mark.worker


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.jsonl"))


def training_pids(drain_dir: Path) -> dict[str, int]:
    """{"rank N": pid} of the training processes registered for the preStop hook."""
    out = {}
    for f in drain_dir.glob("*") if drain_dir.is_dir() else []:
        try:
            out[f.read_text().strip()] = int(f.name)
        except (OSError, ValueError):
            pass
    return out


def step_of(ckpt: Path) -> int:
    try:
        return progress_at(ckpt).step
    except (OSError, ValueError):
        return 0


def drain_mid_run(cfg: dict, tmp: Path, env: dict, drain_dir: Path) -> int:
    """Start the job, SIGTERM rank 1 (not the rank that writes checkpoints) after 3 steps; wait
    for the entrypoint to exit; return its exit status."""
    ckpt = Path(cfg["checkpoint"]["uri"])
    proc = start_entrypoint(cfg, tmp, env, "first")
    try:
        pids = wait_for(lambda: (p := training_pids(drain_dir)).get("rank 1") and p, 240,
                        "both ranks to register", interval=0.1)
        wait_for(lambda: step_of(ckpt) >= 3 or proc.poll() is not None, 120, "step 3", interval=0.05)
        os.kill(pids["rank 1"], signal.SIGTERM)
        return proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_on_a_checkpoint_of_the_last_step_and_resume_loses_none(
        ray_address, tiny_model, toy_data, tmp_path):
    drain_dir, ckpt = tmp_path / "drain", tmp_path / "ckpt"
    # No periodic checkpoint before the end: the only one a drained run has is its emergency one.
    cfg = job_config(tmp_path, model=tiny_model, dataset=toy_data, max_steps=STEPS,
                     precision="fp32", ckpt={"interval_steps": 1000})
    env = entrypoint_env(ray_address, tmp_path, {"TUNESERVE_DRAIN_DIR": str(drain_dir)})
    rc = drain_mid_run(cfg, tmp_path, env, drain_dir)
    log = (tmp_path / "first.log").read_text()
    assert rc == DRAINED_EXIT_CODE, log[-4000:]

    drained = progress_at(ckpt)
    assert drained.state == "Running" and "drained" in drained.message, drained
    assert 3 <= drained.step < STEPS
    committed = CheckpointStore(str(ckpt)).committed()
    assert [c.step for c in committed] == [drained.step]          # exactly the last completed step
    assert committed[0].marker["meta"]["drained"]
    assert drained.last_checkpoint.step == drained.step
    latest = CheckpointStore(str(ckpt)).latest_good(str(tmp_path / "verify"))
    assert latest is not None and latest.step == drained.step     # committed, digests good, newest
    assert training_pids(drain_dir) == {}                         # the preStop hook stops waiting
    assert "rank 0: drained (drain requested on another rank)" in log
    assert "rank 1: drained (SIGTERM)" in log

    rc, log2 = run_entrypoint(cfg, tmp_path, env, "second")
    assert rc == 0, log2[-4000:]
    final = progress_at(ckpt)
    assert final.state == "Succeeded" and final.resumed_from_step == drained.step   # 0 steps lost
    assert f"resumed from checkpoint step {drained.step}" in final.message
    assert final.step == STEPS
    manifest = AdapterManifest.model_validate_json((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest.final_step == STEPS


HANDLER_CHECK = """
import os, signal, time
from tuneserve_workers.train import drain
seen = []
signal.signal(signal.SIGTERM, lambda s, f: seen.append("previous handler"))
assert drain.install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
assert drain.requested() and drain.reason() == "SIGTERM" and seen == [], seen
assert os.listdir(drain.drain_dir()) == [str(os.getpid())]
drain.training_ended()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
assert seen == ["previous handler"] and os.listdir(drain.drain_dir()) == [], seen
print("ok")
"""


def test_the_handler_only_flags_while_training_and_passes_on_otherwise(tmp_path):
    """While training SIGTERM only sets the flag; once training ended it goes to the handler the
    process had (Ray's exits an idle worker), and the pid is unregistered for the preStop hook."""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TUNESERVE_DRAIN_DIR=str(tmp_path / "drain"))
    out = subprocess.run([sys.executable, "-c", HANDLER_CHECK], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
