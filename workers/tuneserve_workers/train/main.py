"""Entrypoint: read the config, check the data, run Ray Train, report the outcome.

Exit status: 0 when the adapter is written, 1 for a failed job (progress state ``Failed`` with the
reason), 2 when the config itself cannot be read, 3 when the run was drained (SIGTERM to a training
process, drain.py): it stopped on an emergency checkpoint of its last step, so a resubmitted run
resumes from it with no step lost (progress keeps state ``Running`` and says so in its message). The dataset is read and validated here, before
any Ray worker starts, so a malformed row fails in seconds with its file and line.

Ray: connects to the cluster in ``RAY_ADDRESS`` (the RayJob's) or starts a local one. In a
tuneserve cluster every Ray pod already carries the job's environment (Secret references), so
nothing is forwarded by default. With ``TUNESERVE_FORWARD_ENV=1`` the driver forwards its
storage, Hugging Face and tuneserve variables (``AWS_*``, ``FSSPEC_*``, ``HF_*``, ``GOOGLE_*``,
``TUNESERVE_*``...) to the workers through the job's runtime_env -- for clusters started without
them (the tests); the values then appear in the Ray job's runtime_env, readable from the Ray
dashboard. ``TUNESERVE_MAX_FAILURES`` (default 0) lets Ray restart failed workers in place; each
restart resumes from the newest good checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from ..contract import CONFIG_ENV, AcceleratorRuntime, BasePrecision, DataParallel, Method, Progress, TrainJobConfig
from .checkpoint import CheckpointStore
from .config import checkpoint_uri_of, load_config
from .drain import DRAINED_EXIT_CODE
from .data import read_dataset
from .errors import ConfigError, TrainError
from .progress import Reporter
from .storage import Location

log = logging.getLogger("tuneserve.train")
FORWARD_PREFIXES = ("AWS_", "FSSPEC_", "HF_", "HUGGINGFACE_", "GOOGLE_", "GCS_", "TUNESERVE_",
                    "TRANSFORMERS_", "KUBERNETES_SERVICE_")


def _train(payload: dict) -> None:
    """Runs on every Ray Train worker; imported lazily so the driver stays light."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .loop import train_worker
    train_worker(payload)


def _preflight_fp8(cfg: TrainJobConfig) -> None:
    """An FP8 base needs FP8 matmuls, a 16-bit base to quantize, and the fused layers (replicated)."""
    if cfg.training.base_precision is not BasePrecision.fp8:
        return
    where = f"accelerator {cfg.accelerator.vendor}/{cfg.accelerator.product}"
    if not cfg.accelerator.supports_fp8:
        raise ConfigError(f"training.base_precision fp8 needs FP8 matmuls, which {where} does not have")
    if cfg.adapter.method is Method.qlora:
        raise ConfigError("training.base_precision fp8 and method qlora both quantize the base; choose one")
    if cfg.accelerator.data_parallel is DataParallel.sharded:
        raise ConfigError("training.base_precision fp8 runs in the fused layers, which are off when "
                          "data_parallel is sharded; use a placement where one device holds the FP8 base")


def preflight(cfg: TrainJobConfig) -> None:
    """Fail fast on what the driver can check alone: the method, data rows, reachable locations.
    (Memory and the tokenizer are checked on the workers, where the model is loaded.)"""
    if cfg.adapter.method is Method.qlora and not cfg.accelerator.supports_4bit:
        raise ConfigError(f"method qlora needs 4-bit weights, which accelerator "
                          f"{cfg.accelerator.vendor}/{cfg.accelerator.product} does not support; "
                          f"use method lora")
    if cfg.adapter.method is Method.qlora and cfg.accelerator.data_parallel is DataParallel.sharded:
        raise ConfigError("method qlora cannot run with data_parallel sharded: its 4-bit weights "
                          "cannot be split by FSDP2; use method lora, or a placement where one "
                          "device holds the 4-bit model")
    _preflight_fp8(cfg)
    read_dataset(cfg.dataset)
    for what, uri in (("output_uri", cfg.output_uri), ("checkpoint.uri", cfg.checkpoint.uri)):
        parent = Location(uri)
        parent.exists()           # raises StorageError naming the URI when unreachable
    if "://" not in cfg.base_model.uri or cfg.base_model.uri.startswith(("pvc://", "file://")):
        from .storage import local_path
        if not os.path.isdir(local_path(cfg.base_model.uri)):
            raise TrainError(f"{cfg.base_model.uri}: base model directory not found")


def rank_resources(acc: AcceleratorRuntime) -> dict[str, float]:
    """Ray resources of one training process: one device (its units of the Ray resource, e.g.
    2 neuron cores per Trainium device) and one CPU; Ray packs a pod's processes onto it."""
    resources: dict[str, float] = {"CPU": 1}
    if acc.ray_resource and acc.devices_per_worker:
        units = acc.ray_resources_per_worker or acc.devices_per_worker
        resources[acc.ray_resource] = units / acc.devices_per_worker
    return resources


def run_ray(cfg: TrainJobConfig) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ray_drain import DrainingTorchConfig

    acc = cfg.accelerator
    forward = os.environ.get("TUNESERVE_FORWARD_ENV") == "1"
    env = {k: v for k, v in os.environ.items() if forward and k.startswith(FORWARD_PREFIXES)}
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    backend = {"rccl": "nccl"}.get(acc.distributed_backend, acc.distributed_backend)
    storage = os.environ.get("TUNESERVE_RAY_STORAGE", "/tmp/tuneserve-ray")
    trainer = TorchTrainer(
        _train,
        train_loop_config={"config": cfg.model_dump(mode="json")},
        torch_config=DrainingTorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=acc.world_size, use_gpu=acc.ray_resource == "GPU",
                                     resources_per_worker=rank_resources(acc)),
        run_config=RunConfig(name=f"{cfg.job_name}-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             failure_config=FailureConfig(
                                 max_failures=int(os.environ.get("TUNESERVE_MAX_FAILURES", "0")))),
    )
    trainer.fit()


def train_error_in(exc: BaseException) -> TrainError | None:
    """The TrainError a Ray worker raised, wherever Ray wrapped it."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TrainError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        for attr in ("worker_failures", "errors"):
            v = getattr(e, attr, None)
            todo += list(v.values()) if isinstance(v, dict) else list(v or [])
    return None


def drained_at(cfg: TrainJobConfig, final: Progress | None) -> int | None:
    """The step a drained run stopped at: its newest checkpoint is marked drained and it has no
    artifact (a run drained at its last step still ends Succeeded once resumed and finished)."""
    if final is not None and final.state == "Succeeded":
        return None
    newest = next(iter(CheckpointStore(cfg.checkpoint.uri).committed()), None)
    if newest is None or not newest.marker.get("meta", {}).get("drained"):
        return None
    return newest.step


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m tuneserve_workers.train")
    ap.add_argument("--config", default=os.environ.get(CONFIG_ENV),
                    help=f"path of the job's JSON config (default: ${CONFIG_ENV})")
    args = ap.parse_args(argv)
    if not args.config:
        ap.error(f"--config or ${CONFIG_ENV} is required")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error("%s", e)
        uri = checkpoint_uri_of(args.config)
        if uri:
            Reporter.from_env(uri).update(force=True, state="Failed", message=str(e))
        return 2

    reporter = Reporter.from_env(cfg.checkpoint.uri)
    prev = reporter.load_previous()
    if prev is not None:
        reporter.progress = prev
    reporter.update(force=True, state="Starting", message=None)
    try:
        preflight(cfg)
        run_ray(cfg)
    except BaseException as e:  # noqa: BLE001 -- every failure must end as a Failed state
        if isinstance(e, KeyboardInterrupt):
            raise
        te = train_error_in(e)
        msg = te.message if te else f"{type(e).__name__}: {e}"
        log.error("training failed: %s", msg)
        fresh = reporter.load_previous()   # keep what the workers last reported
        if fresh is not None:
            reporter.progress = fresh
        reporter.update(force=True, state="Failed", message=msg)
        return 1
    final = reporter.load_previous()
    drained = drained_at(cfg, final)
    if drained is not None:
        log.info("drained: stopped at step %d on its checkpoint; resubmit to resume", drained)
        return DRAINED_EXIT_CODE
    if final is None or final.state != "Succeeded":
        reporter.update(force=True, state="Failed", message="training ended without an artifact")
        return 1
    log.info("done: step %d, adapter at %s", final.step, final.artifact_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
