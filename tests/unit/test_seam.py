"""The seam between what the operator renders and what the workers read, for every catalog
profile: env variables, and the Serve replica's Ray actor options."""
from __future__ import annotations

import ast

import pytest
import yaml

from helpers import REPO, load_example
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.modelserve import ModelServe
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.modelserve.builders.children import build_modelserve_children
from tuneserve.core.catalog import load_catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve_workers import contract

CATALOG = load_catalog()
WORKERS = REPO / "workers" / "tuneserve_workers"
PROFILES = [p.key for p in CATALOG.profiles]
ENV_READERS = {("os", "getenv"), ("environ", "get"), ("environ", "pop"), ("environ", "setdefault")}


def candidate(key: str, devices: int = 2, workers: int = 1) -> Candidate:
    return Candidate(CATALOG.get(key), devices, workers, "test")


def finetune_objects(key: str) -> list[dict]:
    job = FineTuneJob.from_body({**load_example("finetunejob-qwen-bank.yaml"),
                                 "metadata": {"name": "fin-v1", "namespace": "bank", "uid": "u1"}})
    return build_finetune_children(job, candidate(key, workers=2), None, 1, CATALOG)


def modelserve_objects(key: str) -> list[dict]:
    serve = ModelServe.from_body({**load_example("modelserve-qwen-bank.yaml"),
                                  "metadata": {"name": "bank-llm", "namespace": "bank", "uid": "u2"}})
    return build_modelserve_children(serve, candidate(key), None, [], CATALOG)


def pod_templates(obj: dict) -> list[dict]:
    """Every pod template of a RayJob/RayService (head, worker groups, a submitter if any)."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    if spec.get("submitterPodTemplate"):
        templates.append(spec["submitterPodTemplate"])
    return templates


def rendered_env_names(objects: list[dict]) -> set[str]:
    ray = [o for o in objects if o["kind"] in ("RayJob", "RayService")]
    return {e["name"] for o in ray for t in pod_templates(o) for c in t["spec"]["containers"] for e in c["env"]}


def _name_value(node: ast.AST, scope: dict[str, object]) -> object:
    """The string an env-name expression stands for: a literal, a module constant, or
    ``contract.X`` / a name imported from the contract."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "contract":
        return getattr(contract, node.attr, None)
    return None


def _reads(tree: ast.AST) -> list[ast.AST]:
    """The name arguments of os.environ.get/[...]/pop/setdefault and os.getenv calls."""
    out: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            owner = node.func.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if (owner_name, node.func.attr) in ENV_READERS:
                out.append(node.args[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            out.append(node.slice)
    return out


def worker_env_reads() -> set[str]:
    """Every env variable name the worker code reads, resolved through the contract's constants,
    the module's own constants and names imported from the contract."""
    names: set[str] = set()
    for path in sorted(WORKERS.rglob("*.py")):
        tree = ast.parse(path.read_text())
        scope: dict[str, object] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                scope.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("contract"):
                scope.update({a.asname or a.name: getattr(contract, a.name, None) for a in node.names})
        names |= {v for v in (_name_value(n, scope) for n in _reads(tree)) if isinstance(v, str)}
    return names


READ = worker_env_reads()


def test_the_scan_sees_the_known_reads():
    """Guards the scanner itself: reads through contract constants, module constants and literals."""
    assert {contract.CONFIG_ENV, contract.PROGRESS_CONFIGMAP_ENV, contract.ADAPTERS_FILE_ENV,
            contract.SERVE_STATUS_CONFIGMAP_ENV, "TUNESERVE_PROBE_TIMEOUT_S", "TUNESERVE_FORWARD_ENV"} <= READ


@pytest.mark.parametrize("key", PROFILES)
@pytest.mark.parametrize("render", [finetune_objects, modelserve_objects], ids=["finetunejob", "modelserve"])
def test_every_rendered_tuneserve_variable_is_read_by_the_workers(render, key):
    rendered = {n for n in rendered_env_names(render(key)) if n.startswith("TUNESERVE_")}
    assert rendered, "the operator renders its own variables into every Ray pod"
    assert rendered <= READ, f"rendered but read by no worker: {sorted(rendered - READ)}"


@pytest.mark.parametrize("key", PROFILES)
def test_the_replica_actor_options_are_computed_once(key):
    """serveConfigV2's ray_actor_options win in Ray Serve; the serve app derives the same from
    its args, so what runs is what both sides think."""
    rayservice = next(o for o in modelserve_objects(key) if o["kind"] == "RayService")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    rendered = app["deployments"][0]["ray_actor_options"]
    assert rendered == contract.replica_actor_options(contract.ServeAppConfig.model_validate(app["args"]))
    app_module = pytest.importorskip("tuneserve_workers.serve.app")
    assert app_module.actor_options(contract.ServeAppConfig.model_validate(app["args"])) == rendered


@pytest.mark.parametrize("key,devices,expected", [
    ("cpu/cpu", 4, {"num_cpus": 4}),
    ("nvidia/h100-80gb", 2, {"num_cpus": 1, "num_gpus": 2}),
    ("huawei/ascend910b", 2, {"num_cpus": 1, "resources": {"NPU": 2}}),
    ("aws/inf2", 2, {"num_cpus": 1, "resources": {"neuron_cores": 4}}),
])
def test_replica_actor_options_per_accelerator(key, devices, expected):
    serve = ModelServe.from_body({**load_example("modelserve-qwen-bank.yaml"),
                                  "metadata": {"name": "bank-llm", "namespace": "bank", "uid": "u2"}})
    rayservice = next(o for o in build_modelserve_children(serve, candidate(key, devices), None, [], CATALOG)
                      if o["kind"] == "RayService")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["deployments"][0]["ray_actor_options"] == expected
