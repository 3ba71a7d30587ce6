"""One replica's server: a vLLM AsyncLLM engine, vLLM's own OpenAI FastAPI app on top of it, and
the tuneserve additions (adapter reconciler, ``/tuneserve/status``, ``/tuneserve/metrics``,
``x-tuneserve-replica`` response header, a readiness probe).

No Ray import here: ``app.py`` wraps this in a Ray Serve deployment; tests and the bench could
run it under plain uvicorn too.

Engine arguments go through vLLM's own CLI parser (``make_arg_parser``), so ``extra_engine_args``
accepts exactly what ``vllm serve`` accepts (``{"enforce_eager": "true", "max_num_seqs": "64"}``
-> ``--enforce-eager --max-num-seqs 64``; ``"false"`` -> ``--no-<flag>``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Optional

from ..contract import ADAPTERS_FILE_ENV, ADAPTERS_KEY, SERVE_STATUS_CONFIGMAP_ENV, ServeAppConfig
from ..kube import in_cluster
from .adapters import AdapterReconciler
from .engine_dtype import resolve_engine_dtype, stored_dtype
from .engine_output import EngineOutput
from .failure import failure_cause
from .metrics import ServeMetrics
from .report import ConfigMapKeySource, StatusPublisher, build_report

log = logging.getLogger("tuneserve.serve")

ADAPTER_POLL_ENV = "TUNESERVE_ADAPTER_POLL_S"        # default 2
ADAPTER_RETRY_ENV = "TUNESERVE_ADAPTER_RETRY_S"      # default 30
PROBE_TIMEOUT_ENV = "TUNESERVE_PROBE_TIMEOUT_S"      # default 60
OUTPUT_DRAIN_S = 10.0                                # wait for a failed engine's last words
REPLICA_HEADER = "x-tuneserve-replica"


def engine_argv(cfg: ServeAppConfig, model_path: str, dtype: str) -> list[str]:
    """``vllm serve`` arguments for this config (model given as a local directory), with the
    dtype ``engine_dtype.resolve_engine_dtype`` chose."""
    argv = ["--model", model_path, "--served-model-name", cfg.served_model_name, "--dtype", dtype,
            "--tensor-parallel-size", str(cfg.tensor_parallel_size),
            "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
            "--enable-lora", "--max-loras", str(cfg.max_loras),
            "--max-lora-rank", str(cfg.max_lora_rank)]
    if cfg.base_model.revision and model_path == cfg.base_model.uri:
        argv += ["--revision", cfg.base_model.revision]
    if cfg.max_model_len:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.quantization:
        argv += ["--quantization", cfg.quantization]
    for key, value in cfg.extra_engine_args.items():
        flag = "--" + key.lstrip("-").replace("_", "-")
        if value in ("true", "True", ""):
            argv.append(flag)
        elif value in ("false", "False"):
            argv.append("--no-" + flag[2:])
        else:
            argv += [flag, value]
    return argv


def _vllm_frontend():
    """vLLM's OpenAI front-end pieces: (make_arg_parser, validate_parsed_serve_args, build_app,
    init_app_state). vLLM moved them from ``entrypoints.openai`` (<= 0.25, the CUDA build the GPU
    bench machine can run with its torch 2.11) to ``entrypoints.launchers`` (0.32, our CPU lock);
    the functions' signatures are the same in both."""
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:
        from vllm.entrypoints.openai.api_server import build_app, init_app_state
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    return make_arg_parser, validate_parsed_serve_args, build_app, init_app_state


def parse_engine_args(argv: list[str]):
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    make_arg_parser, validate_parsed_serve_args, _, _ = _vllm_frontend()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def resolve_model(cfg: ServeAppConfig) -> str:
    """A local directory (or hub id) for the base model; object-store URIs are downloaded."""
    uri = cfg.base_model.uri
    if uri.startswith("hf://"):
        return uri[len("hf://"):].strip("/")
    if "://" not in uri:
        return uri
    from ..train.storage import materialize_model
    return materialize_model(uri, cfg.base_model.revision)


class _Engine:
    """The Loader the reconciler drives: vLLM's OpenAIServingModels (the name -> LoRARequest
    table the OpenAI routes resolve ``model`` against) plus the engine's LoRA cache."""

    def __init__(self, engine, models):
        self.engine, self.models = engine, models

    async def load(self, name: str, path: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
        res = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(
            lora_name=name, lora_path=path, load_inplace=name in self.models.lora_requests))
        if not isinstance(res, str):  # ErrorResponse
            err = getattr(res, "error", res)
            raise RuntimeError(getattr(err, "message", None) or str(err))

    async def unload(self, name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest
        req = self.models.lora_requests.get(name)
        await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if req is not None:  # the models table forgets it; free the engine's cache slot too
            await self.engine.remove_lora(req.lora_int_id)


class ReplicaServer:
    def __init__(self, cfg: ServeAppConfig, *, replica_id: Optional[str] = None,
                 actor_id: Optional[str] = None, metrics: Optional[ServeMetrics] = None):
        self.cfg = cfg
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.actor_id = actor_id
        self.started_at = time.time()
        self.metrics = metrics or ServeMetrics()
        self.engine = None
        self.app = None
        self.reconciler: Optional[AdapterReconciler] = None
        self.ready = False
        self.last_probe: dict = {}
        self.dtype: Optional[str] = None       # resolved at start (engine_dtype.py)
        self.failure: Optional[str] = None     # why the engine is unusable, once it is
        self.output = EngineOutput()
        self.publisher = StatusPublisher(
            self.replica_id, self._report,
            configmap=cfg.status_configmap or os.environ.get(SERVE_STATUS_CONFIGMAP_ENV))

    # ------------------------------------------------------------------- start-up
    async def start(self):
        """Start the engine, build the app, load the desired adapters, answer one completion.
        Returns the ASGI app. Ray Serve marks the replica ready only after this returns. A failure
        is reported (state Failed, its cause named) before it is raised as ``EngineFailed``."""
        self.publisher.publish_now()           # "Starting", so the operator sees it exists
        try:
            await self._start_engine()
            await self._build_app()
            await self.reconciler.sync()       # a new replica serves the full set from the start
            await self.probe()                 # and has answered a completion
        except Exception as e:
            raise await self._failed("engine failed to start", e) from e
        self.reconciler.start()
        self.ready = True
        self._publish()
        self.publisher.start()
        log.info("replica %s ready (dtype %s): %s", self.replica_id, self.dtype, self.reconciler.counts())
        return self.app

    async def _start_engine(self) -> None:
        """vLLM's AsyncLLM with the config's engine arguments; its processes write through
        ``self.output``."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path = await asyncio.to_thread(resolve_model, self.cfg)
        self.dtype, why = resolve_engine_dtype(self.cfg.dtype, stored_dtype(model_path))
        log.info("engine dtype %s (%s)", self.dtype, why)
        self.args = parse_engine_args(engine_argv(self.cfg, model_path, self.dtype))
        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        self.max_lora_rank = vllm_config.lora_config.max_lora_rank
        with self.output.capture():
            self.engine = AsyncLLM.from_vllm_config(
                vllm_config=vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=engine_args.enable_log_requests,
                disable_log_stats=engine_args.disable_log_stats)
        self._count_requests(self.engine)

    async def _build_app(self) -> None:
        """vLLM's OpenAI app on the engine, our routes, and the adapter reconciler."""
        _, _, build_app, init_app_state = _vllm_frontend()
        tasks = await self.engine.get_supported_tasks()
        app = build_app(self.args, tasks, self.engine.model_config)
        await init_app_state(self.engine, app.state, self.args, tasks)
        self._add_routes(app)
        self.app = _ReplicaHeader(app, self.replica_id)
        self.reconciler = AdapterReconciler(
            _Engine(self.engine, app.state.openai_serving_models),
            base=self.cfg.base_model, max_rank=self.max_lora_rank,
            adapters_file=self.cfg.adapters_file or os.environ.get(ADAPTERS_FILE_ENV),
            initial=self.cfg.adapters,
            interval=float(os.environ.get(ADAPTER_POLL_ENV, "2")),
            retry_after=float(os.environ.get(ADAPTER_RETRY_ENV, "30")),
            on_change=self._publish,
            source=(ConfigMapKeySource(self.cfg.adapters_configmap, ADAPTERS_KEY)
                    if self.cfg.adapters_configmap and in_cluster() else None))

    async def _failed(self, what: str, error: BaseException) -> "EngineFailed":
        """Record and report why the engine is unusable; the error to raise. The engine is shut
        down first, so its processes have finished writing what killed them."""
        if self.failure is None:
            if self.engine is not None:
                self.engine.shutdown()
            await asyncio.to_thread(self.output.wait_closed, OUTPUT_DRAIN_S)
            self.failure = f"{what}: {failure_cause(self.output.text(), error)}"
            self.ready = False
            self.metrics.ready(False)
            log.error("replica %s: %s", self.replica_id, self.failure)
            await asyncio.to_thread(self.publisher.publish_now)
        return EngineFailed(self.failure)

    def _count_requests(self, engine) -> None:
        """Requests per model name, counted where every OpenAI route ends up (engine.generate)."""
        generate, metrics, base = engine.generate, self.metrics, self.cfg.served_model_name
        self._generate = generate                # the probe bypasses the count

        def counted(*a, lora_request=None, **kw):
            metrics.request(lora_request.lora_name if lora_request is not None else base)
            return generate(*a, lora_request=lora_request, **kw)
        engine.generate = counted

    def _add_routes(self, app) -> None:
        from fastapi.responses import JSONResponse, Response

        @app.get("/tuneserve/status")
        async def status():  # noqa: ANN202
            return JSONResponse(self.status())

        @app.get("/tuneserve/metrics")
        async def metrics():  # noqa: ANN202
            body, ctype = self.metrics.render()
            return Response(body, media_type=ctype)

    # ---------------------------------------------------------------------- health
    async def probe(self) -> None:
        """Readiness = can answer a completion: a 1-token greedy generation on the base model."""
        from vllm import SamplingParams
        t0 = time.monotonic()
        timeout = float(os.environ.get(PROBE_TIMEOUT_ENV, "60"))

        async def one():
            out = None
            async for out in self._generate(
                    "Hello", SamplingParams(max_tokens=1, temperature=0.0),
                    request_id=f"tuneserve-probe-{uuid.uuid4().hex}"):
                pass
            if out is None or not out.outputs or not out.outputs[0].token_ids:
                raise RuntimeError("probe generation returned no token")
        try:
            await asyncio.wait_for(one(), timeout)
        except Exception as e:
            self.last_probe = {"ok": False, "at": time.time(), "error": f"{type(e).__name__}: {e}"}
            self.metrics.ready(False)
            raise
        self.last_probe = {"ok": True, "at": time.time(),
                           "seconds": round(time.monotonic() - t0, 4)}
        self.metrics.ready(True)

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine is alive and answers a 1-token completion. A dead
        engine is reported with its cause (Ray Serve then replaces the replica)."""
        if self.engine is None:
            raise RuntimeError("engine not started")
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self.engine.errored:
            raise await self._failed("engine died", self.engine.dead_error)
        await self.engine.check_health()
        await self.probe()

    async def shutdown(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.stop()
        if self.engine is not None:
            self.engine.shutdown()

    # ---------------------------------------------------------------------- status
    def status(self) -> dict:
        adapters = self.reconciler.public() if self.reconciler else []
        rec = self.reconciler
        return {
            "replica": {"id": self.replica_id, "actor_id": self.actor_id, "pid": os.getpid(),
                        "host": socket.gethostname(), "started_at": self.started_at},
            "ready": self.ready and bool(self.last_probe.get("ok")),
            "last_probe": self.last_probe,
            "served_model_name": self.cfg.served_model_name,
            "base_model": self.cfg.base_model.model_dump(),
            "device": self.cfg.device,
            "dtype": self.dtype,
            "failure": self.failure,
            "adapters_file": rec.adapters_file if rec else None,
            "adapters_file_digest": rec.file_digest if rec else None,
            "adapters_file_error": rec.file_error if rec else None,
            "synced_at": rec.synced_at if rec else None,
            "adapters": adapters,
        }

    def _publish(self) -> None:
        if self.reconciler is None:
            return
        self.metrics.adapters(self.reconciler.adapters.values())
        self.publisher.poke()

    def _report(self) -> str:
        if self.failure is not None:
            return build_report(self.replica_id, "Failed", self.reconciler, self.failure, dtype=self.dtype)
        ok = self.ready and bool(self.last_probe.get("ok"))
        msg = None if ok or not self.last_probe else self.last_probe.get("error")
        return build_report(self.replica_id, "Ready" if ok else "Starting", self.reconciler, msg, dtype=self.dtype)


class EngineFailed(RuntimeError):
    """The engine could not start or died; the message names the cause (failure.py)."""


class _ReplicaHeader:
    """Pure-ASGI middleware: names the replica that answered (``x-tuneserve-replica``)."""

    def __init__(self, app, replica_id: str):
        self.inner, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())
        self.state = app.state

    def add_exception_handler(self, *args, **kwargs):  # Ray Serve registers its own here
        self.inner.add_exception_handler(*args, **kwargs)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", ())) + [self.header]
            await send(message)
        await self.inner(scope, receive, tagged)
