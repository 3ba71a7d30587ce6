"""A ModelServe's small children: the ServeAppConfig (Ray Serve app args), the adapters
ConfigMap (the live desired set), the serve-status ConfigMap (the replicas' channel back), and
the endpoint URL."""
from __future__ import annotations

from typing import Any

from tuneserve.modelserve.adapters import render_adapters_json
from tuneserve.api.modelserve import VLLM_QUANTIZATION, ModelServe
from tuneserve.builders.common import (
    adapters_configmap_name, object_meta, openai_service_name, serve_status_configmap_name,
)
from tuneserve.core.scheduling.fit import Candidate
from tuneserve_workers import contract


def endpoint_url(serve: ModelServe) -> str:
    """OpenAI-compatible base URL of the Service KubeRay keeps pointed at the active cluster."""
    return f"http://{openai_service_name(serve.metadata.name)}.{serve.metadata.namespace}.svc.cluster.local:{contract.SERVE_PORT}/v1"


def build_serve_app_config(serve: ModelServe, candidate: Candidate) -> contract.ServeAppConfig:
    """Spec + placement -> the serve app's args. Holds no adapters (they live in the adapters
    ConfigMap), so adapter changes never change the RayService."""
    spec, profile = serve.spec, candidate.profile
    ns, name = serve.metadata.namespace, serve.metadata.name
    tp = candidate.devices_per_worker
    engine = spec.engine
    return contract.ServeAppConfig(
        served_model_name=spec.model_name(),
        base_model=contract.ModelSource(uri=spec.base_model.location(), revision=spec.base_model.revision()),
        # Worker-scoped profiles (CPU) count cores as devices: the engine itself is not sharded.
        tensor_parallel_size=1 if profile.memory_scope == "worker" else tp,
        max_model_len=engine.max_model_len,
        gpu_memory_utilization=profile.memory_utilization(engine.gpu_memory_utilization),
        max_loras=engine.max_loras,
        max_lora_rank=engine.max_lora_rank,
        quantization=VLLM_QUANTIZATION[engine.quantization],
        dtype=profile.engine_dtype(engine.dtype),
        extra_engine_args=dict(sorted((engine.extra_engine_args or {}).items())),
        device=profile.vllm_platform,
        adapters=[],
        adapters_file=contract.ADAPTERS_FILE,
        adapters_configmap=f"{ns}/{adapters_configmap_name(name)}",
        status_configmap=f"{ns}/{serve_status_configmap_name(name)}",
        model_serve=f"{ns}/{name}",
        vllm_plugin=profile.vllm_plugin,
        ray_resource=profile.ray_resource,
        ray_resources_per_replica=tp * profile.ray_resources_per_device if profile.ray_resource else 0,
        # Without an accelerator resource the replica computes on its cores: it holds all of them.
        replica_num_cpus=1 if profile.ray_resource else tp,
    )


def build_adapters_configmap(serve: ModelServe, desired: list[contract.ServeAdapter]) -> dict[str, Any]:
    """The desired adapter set (``adapters.resolve_adapters(...).desired``), mounted at
    ``contract.ADAPTERS_DIR`` in every Ray pod. The only child that changes with the adapter list."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(serve, adapters_configmap_name(serve.metadata.name)),
        "data": {contract.ADAPTERS_KEY: render_adapters_json(desired)},
    }


def build_serve_status_configmap(serve: ModelServe) -> dict[str, Any]:
    """The replicas' report channel. Rendered without data: replicas own their keys; the operator
    creates it once (create-if-missing, never overwrite) and prunes stale keys."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(serve, serve_status_configmap_name(serve.metadata.name)),
    }
