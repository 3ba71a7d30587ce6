"""The serve app in the mode the operator renders by default (ModelServe ``spec.ingress: Direct``):
real Ray Serve with exactly the env of ``builders.rayservice.ingress_env`` (the serve port swapped
for a free one), real vLLM on CPU. What KubeRay relies on: the replica itself answers
``/-/healthz`` (its worker readiness probe) and completions on that one port, no proxy in the way.
"""
from __future__ import annotations

import os

import pytest

from serve_helpers import PYTHONPATH, cpu_serving_dtype, http, wait_for
from worker_helpers import free_port

pytestmark = pytest.mark.worker
APP = "ms-direct"


def test_replica_takes_traffic_on_the_pinned_port_without_a_proxy(tmp_path):
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema
    from tuneserve.api.modelserve import Ingress
    from tuneserve.modelserve.builders.rayservice import ingress_env
    from tuneserve_workers import contract
    from tuneserve_workers.serve.app import DEPLOYMENT_NAME
    from tuneserve_workers.testing.tiny import build_tiny_model

    port = free_port()
    rendered = {e["name"]: e["value"] for e in ingress_env(Ingress.Direct)}
    # the operator pins [MIN, MAX) to the serve port; here the same one-port range on a free port
    assert (rendered["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], rendered["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) \
        == (str(contract.SERVE_PORT), str(contract.SERVE_PORT + 1))
    ray_env = {**rendered, "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
               "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}
    model = build_tiny_model(str(tmp_path / "model"))
    env = {"PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TUNESERVE_SERVE_STATUS_DIR": str(tmp_path / "status"), **ray_env}
    saved = {k: os.environ.get(k) for k in ray_env}
    os.environ.update(ray_env)      # the raylet, hence the Serve controller, reads them at start
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
                 _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
        cfg = {"served_model_name": "tiny", "base_model": {"uri": model}, "max_loras": 2, "max_lora_rank": 8,
               "device": "cpu", "dtype": cpu_serving_dtype(),
               "extra_engine_args": {"max_model_len": "256", "max_num_seqs": "8"},
               "adapters_file": str(tmp_path / "adapters.json")}
        (tmp_path / "adapters.json").write_text("[]")
        client = serve_start(http_options={"host": "127.0.0.1", "port": free_port()})
        client.deploy_apps(ServeDeploySchema.model_validate({"applications": [{
            "name": APP, "route_prefix": "/", "import_path": contract.SERVE_IMPORT_PATH,
            "runtime_env": {"env_vars": env}, "args": cfg,
            "deployments": [{"name": DEPLOYMENT_NAME, "num_replicas": 1}]}]}))
        url = f"http://127.0.0.1:{port}"
        app = wait_for(lambda: (lambda a: a if a and a.status in ("RUNNING", "DEPLOY_FAILED") else None)(
            serve.status().applications.get(APP)), 300, f"{APP} to be RUNNING", interval=1)
        assert app.status == "RUNNING", app.message

        code, body, _ = http(f"{url}/-/healthz")
        assert code == 200, body
        code, doc, _ = http(f"{url}/v1/completions", {"model": "tiny", "prompt": "what color", "max_tokens": 4,
                                                      "temperature": 0})
        assert code == 200 and doc["usage"]["completion_tokens"] >= 1, doc
        # Ray 2.60 still starts a proxy on the head node in this mode (its own port, not the
        # direct range); the operator keeps the head out of the Service (excludeHeadPodFromServeSvc)
        proxy_port = client.http_config.port
        assert proxy_port != port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
