"""Every device trains: one process per device on every worker, DDP or FSDP2 over gloo on CPU.

The entrypoint runs as a real subprocess against one Ray instance with 4 logical CPUs (one per
training process; the processes share this machine's cores). "2 workers x 2 devices" is the
config a 2-pod placement renders; here all four processes run on the one Ray node.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from worker_helpers import (STEPS, assert_learned, entrypoint_env, job_config, kill_at_first_checkpoint,
                            progress_at, run_entrypoint)
from tuneserve_workers.contract import MANIFEST_FILE, AdapterManifest

pytestmark = pytest.mark.worker
RAY_CPUS = 4                 # read by the ray_address fixture
INTERVAL = 5                 # checkpoint every 5 steps and keep them all: the loss curve
# fp32 on CPU: ranks differ from one process only in the order floating-point sums are taken.
CURVE_TOLERANCE = 2e-3       # relative, at every checkpointed step


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    from tuneserve_workers.testing.tiny import write_toy_dataset
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.jsonl"))


def dp_config(tmp: Path, tiny_model: str, toy_data: str, *, workers: int, devices: int,
              mode: str = "replicated", **training) -> dict:
    cfg = job_config(tmp, model=tiny_model, dataset=toy_data, max_steps=STEPS,
                     ckpt={"interval_steps": INTERVAL, "keep": STEPS // INTERVAL}, **training)
    cfg["accelerator"].update(workers=workers, devices_per_worker=devices, data_parallel=mode,
                              price_per_device_hour=3.6)
    return cfg


def loss_curve(ckpt: Path) -> dict[int, float]:
    """The training loss at every committed checkpoint (from the markers' metadata)."""
    out = {}
    for marker in ckpt.glob("step-*/COMMITTED"):
        m = json.loads(marker.read_text())
        out[m["step"]] = m["meta"]["loss"]
    return dict(sorted(out.items()))


def run_job(tmp: Path, cfg: dict, ray_address: str, name: str) -> tuple[str, AdapterManifest]:
    tmp.mkdir(parents=True, exist_ok=True)
    rc, log = run_entrypoint(cfg, tmp, entrypoint_env(ray_address, tmp), name=name, timeout=420)
    assert rc == 0, log[-4000:]
    return log, AdapterManifest.model_validate_json((Path(cfg["output_uri"]) / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def four_ranks(ray_address, tiny_model, toy_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("four")
    cfg = dp_config(tmp, tiny_model, toy_data, workers=2, devices=2, precision="fp32")
    log, manifest = run_job(tmp, cfg, ray_address, "four")
    return tmp, cfg, log, manifest


def test_two_workers_of_two_devices_train_as_four_ranks_on_the_one_rank_curve(
        four_ranks, ray_address, tiny_model, toy_data, tmp_path):
    tmp, cfg, log, manifest = four_ranks
    progress = progress_at(tmp / "ckpt")
    assert progress.state == "Succeeded" and progress.step == STEPS
    assert progress.world_size == 4 and progress.data_parallel == "replicated"
    one = dp_config(tmp_path, tiny_model, toy_data, workers=1, devices=1, precision="fp32")
    _, single = run_job(tmp_path, one, ray_address, "one")
    four_curve, one_curve = loss_curve(tmp / "ckpt"), loss_curve(tmp_path / "ckpt")
    assert list(four_curve) == list(range(INTERVAL, STEPS + 1, INTERVAL)) == list(one_curve)
    for step, loss in one_curve.items():
        assert four_curve[step] == pytest.approx(loss, rel=CURVE_TOLERANCE), (step, four_curve, one_curve)
    assert four_curve[STEPS] < four_curve[INTERVAL] / 3          # and it learned
    assert manifest.tokens_trained == single.tokens_trained      # the same global batches
    # Accelerator-hours count the four processes that trained: 4 x the training wall time (the
    # last checkpoint's, plus writing the artifact), and the single run's 1 x its own.
    for ckpt, devices, m in ((tmp / "ckpt", 4, manifest), (tmp_path / "ckpt", 1, single)):
        wall = last_checkpoint_elapsed(ckpt)
        assert devices * wall / 3600 <= m.accelerator_hours <= devices * (wall + 60) / 3600, (devices, wall, m)


def last_checkpoint_elapsed(ckpt: Path) -> float:
    import torch
    newest = max(ckpt.glob("step-*/state.pt"))
    return torch.load(newest, weights_only=False)["elapsed_s"]


def test_a_killed_four_rank_run_resumes_on_two_ranks_to_the_same_final_step(
        four_ranks, ray_address, tiny_model, toy_data, tmp_path):
    """After a fallback to a smaller placement (1 worker x 2 devices) the job continues from the
    checkpoint the 4 ranks wrote: same step, same data position, same global batch."""
    cfg = dp_config(tmp_path, tiny_model, toy_data, workers=2, devices=2, precision="fp32")
    env = entrypoint_env(ray_address, tmp_path)
    ckpt = tmp_path / "ckpt"
    newest = kill_at_first_checkpoint(cfg, tmp_path, env, RAY_CPUS)
    assert 0 < newest < STEPS

    cfg["accelerator"].update(workers=1, devices_per_worker=2)
    _, resumed = run_job(tmp_path, cfg, ray_address, "second")
    progress = progress_at(ckpt)
    assert progress.state == "Succeeded" and progress.step == STEPS == resumed.final_step
    assert progress.resumed_from_step == newest and progress.world_size == 2
    assert f"saved by 4 ranks, resumed on 2" in progress.message
    straight = four_ranks[3]
    assert resumed.tokens_trained == straight.tokens_trained
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-2)


def test_the_sharded_base_fsdp2_trains_the_toy_task(ray_address, tiny_model, toy_data, tmp_path):
    """FSDP2 over two processes (gloo): the adapter it writes answers the toy questions."""
    cfg = dp_config(tmp_path, tiny_model, toy_data, workers=1, devices=2, mode="sharded")
    log, manifest = run_job(tmp_path, cfg, ray_address, "sharded")
    progress = progress_at(tmp_path / "ckpt")
    assert progress.state == "Succeeded" and progress.world_size == 2
    assert progress.data_parallel == "sharded" and "(sharded)" in log, log[-3000:]
    assert_learned(manifest, tmp_path / "out", tiny_model, toy_data)


def test_a_sharded_checkpoint_resumes_in_replicated_mode_on_the_same_loss(tmp_path):
    """bench/train_loop_modes.py on CPU: the worker's loop in FSDP2 mode, then resumed from its
    step-20 checkpoint without sharding, ends on the uninterrupted run's loss (fp32: to 1e-4)."""
    import subprocess
    import sys
    from worker_helpers import PYTHONPATH, REPO
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_loop_modes.py"), "--hidden", "128",
                          "--layers", "2", "--tolerance", "1e-4"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "resumed from checkpoint step 20" in out.stdout and '"ok": true' in out.stdout
