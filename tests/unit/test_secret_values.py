"""No Secret value ever reaches what the operator writes (issue 15): every child it renders for the
examples in crds/examples/ (both kinds), the status, the Events and the patches of each plan, and
its log lines, over a job's and a serve's life, with Secrets whose values are sentinel strings.

The planners never see a value: the operator's only read of Secrets is the kopf index of their key
names (controller/indexes.py secrets_index), which is run here on Secrets as the API returns them,
and the worlds are built from what it returns. Children reference Secret keys (env valueFrom
secretKeyRef); the operator never writes a Secret (the chart grants get/list/watch only:
test_chart_rbac.py), so no API error body it could log or raise holds one either; the kubernetes
client's DEBUG log of response bodies only ever sees the operator's writes (children, status,
Events), and kopf logs no body of a kind that only has an index (last test).
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from helpers import REPO, fleet, merge_patch

from tuneserve.controller.indexes import _slim_pod, secrets_index
from tuneserve.core.catalog import load_catalog
from tuneserve.core.plan import Plan
from tuneserve.finetunejob.reconcile import World, plan_finetunejob
from tuneserve.modelserve.reconcile import ServeWorld, plan_modelserve

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()
NAMESPACE = "bank"
MARK = "s3nt1nel"   # in every value; nothing the operator renders says it otherwise

# name -> key -> value, as `kubectl create secret generic` would store them.
SECRETS = {
    "hf-token": {"token": f"hf_{MARK}_hub_0a1b2c"},
    "bank-s3": {"AWS_ACCESS_KEY_ID": f"AKIA{MARK}KEYID", "AWS_SECRET_ACCESS_KEY": f"{MARK}/secret+access=key",
                "AWS_SESSION_TOKEN": f"{MARK}-session-token"},
    "gcp-sa": {"key.json": json.dumps({"private_key": f"-----BEGIN {MARK} KEY-----"})},
    "unreferenced": {"password": f"{MARK}-not-referenced-by-anything"},
}
VALUES = [v for keys in SECRETS.values() for v in keys.values()]
ENCODED = [base64.b64encode(v.encode()).decode() for v in VALUES]

# Every credential the API has, merged into each example: both kinds' RayPodOptions take them.
CREDENTIALS = {"credentials": {
    "huggingFaceToken": {"name": "hf-token", "key": "token"},
    "objectStore": {"accessKeyId": {"name": "bank-s3", "key": "AWS_ACCESS_KEY_ID"},
                    "secretAccessKey": {"name": "bank-s3", "key": "AWS_SECRET_ACCESS_KEY"},
                    "sessionToken": {"name": "bank-s3", "key": "AWS_SESSION_TOKEN"},
                    "endpointUrl": "https://s3.bank.internal"},
    "secretEnv": [{"name": "GOOGLE_APPLICATION_CREDENTIALS_JSON", "secretKeyRef": {"name": "gcp-sa", "key": "key.json"}}],
}}
EXAMPLES = sorted((REPO / "crds" / "examples").glob("*.yaml"))


def api_secret(name: str, keys: dict[str, str], as_string_data: bool = False) -> dict[str, Any]:
    """A Secret as the API serves it (data, base64), or as a client wrote it (stringData)."""
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"}}
    if as_string_data:
        body["stringData"] = dict(keys)
    else:
        body["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}
    return body


def indexed_secrets(secrets: dict[str, dict[str, str]]) -> dict[str, frozenset[str]]:
    """Runs the operator's Secret index on each Secret; the planners' view of the namespace."""
    out: dict[str, frozenset[str]] = {}
    for i, (name, keys) in enumerate(sorted(secrets.items())):
        entry = secrets_index(body=kopf.Body(api_secret(name, keys, as_string_data=i % 2 == 1)),
                              namespace=NAMESPACE, name=name)
        assert_clean(entry, f"the index entry of Secret {name}")
        (indexed_name, key_names), = entry.values()
        assert indexed_name == name and key_names == frozenset(keys)
        out[name] = key_names
    return out


def assert_clean(what: Any, where: str) -> None:
    text = json.dumps(what, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else repr(o))
    leaked = [v for v in VALUES + ENCODED if v in text] + ([MARK] if MARK in text else [])
    assert not leaked, f"Secret value in {where}: {leaked}"


def assert_plan_clean(plan: Plan, where: str) -> None:
    for i, obj in enumerate(plan.apply):
        assert_clean(obj, f"{where}: applied {obj['kind']} {obj['metadata']['name']} (#{i})")
    assert_clean(plan.delete, f"{where}: deletes")
    assert_clean([dataclasses.asdict(p) for p in plan.patch], f"{where}: patches")
    assert_clean(plan.status, f"{where}: status")
    assert_clean([dataclasses.asdict(e) for e in plan.events], f"{where}: events")


def example(path: Path) -> dict[str, Any]:
    doc = merge_patch(yaml.safe_load(path.read_text()), {"spec": CREDENTIALS})
    doc["metadata"].update(namespace=NAMESPACE, uid=f"uid-{path.stem}", generation=1)
    return doc


def live(plan: Plan, previous: dict | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    out = dict(previous or {})
    out.update({(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in plan.apply})
    return out


def job_world(secrets, children=None) -> World:
    children = children or {}
    return World(nodes=fleet(), pods=[], job_pods=[], ray_jobs={n: o for (k, n), o in children.items() if k == "RayJob"},
                 children=children, progress_configmap=None, secrets=secrets)


def ray_job_states():
    yield {}
    yield {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    yield {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
           "message": "job failed: see the driver logs"}


def job_life(doc: dict[str, Any], secrets: dict[str, frozenset[str]]) -> list[tuple[str, Plan]]:
    """First reconcile, converged, RayJob running, RayJob failed."""
    plans, children, body = [], {}, copy.deepcopy(doc)
    for step, rj_status in enumerate(ray_job_states()):
        for (kind, _), obj in children.items():
            if kind == "RayJob":
                obj["status"] = dict(rj_status)
        plan = plan_finetunejob(copy.deepcopy(body), job_world(secrets, children), CATALOG, NOW + timedelta(minutes=step))
        plans.append((f"step {step}", plan))
        children = live(plan, children)
        if plan.status is not None:
            body["status"] = plan.status
    return plans


def serve_life(doc: dict[str, Any], secrets: dict[str, frozenset[str]]) -> list[tuple[str, Plan]]:
    """First reconcile, then the RayService running on a cluster KubeRay made."""
    def world(children, clusters=()):
        return ServeWorld(nodes=fleet(), pods=[], serve_pods=[], children=children, jobs={"fin-v1": None},
                          secrets=secrets, ray_clusters={c["metadata"]["name"]: c for c in clusters})
    first = plan_modelserve(copy.deepcopy(doc), world({}), CATALOG, NOW)
    children = live(first)
    name = doc["metadata"]["name"]
    rs = children[("RayService", name)]
    rs["status"] = {"activeServiceStatus": {"rayClusterName": f"{name}-x7k2p"}, "pendingServiceStatus": {}}
    group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    cluster = {"metadata": {"name": f"{name}-x7k2p", "namespace": NAMESPACE},   # bounds to patch, with an Event
               "spec": {"workerGroupSpecs": [{"groupName": group, "replicas": 9, "minReplicas": 7, "maxReplicas": 9}]}}
    body = {**copy.deepcopy(doc), "status": first.status}
    second = plan_modelserve(body, world(children, [cluster]), CATALOG, NOW + timedelta(minutes=1))
    return [("first", first), ("running", second)]


def plans_of(path: Path, secrets: dict[str, frozenset[str]]) -> list[tuple[str, Plan]]:
    doc = example(path)
    return job_life(doc, secrets) if doc["kind"] == "FineTuneJob" else serve_life(doc, secrets)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_no_secret_value_in_any_plan_of_an_example(path, caplog):
    caplog.set_level(logging.DEBUG)
    plans = plans_of(path, indexed_secrets(SECRETS))
    rendered = [o for _, plan in plans for o in plan.apply]
    assert rendered, "the example renders children"
    refs = json.dumps(rendered)
    assert '"secretKeyRef": {"name": "bank-s3", "key": "AWS_SECRET_ACCESS_KEY"}' in refs, "references are rendered"
    for where, plan in plans:
        assert_plan_clean(plan, f"{path.name} {where}")
    assert MARK not in caplog.text and not any(v in caplog.text for v in VALUES + ENCODED), "a Secret value was logged"


# Secrets missing or missing a key: the status says which (names and key names), never a value.
BROKEN = [
    pytest.param({k: v for k, v in SECRETS.items() if k != "bank-s3"}, "bank-s3", id="secret-missing"),
    pytest.param({**SECRETS, "bank-s3": {"AWS_ACCESS_KEY_ID": f"{MARK}-only-key"}}, "AWS_SECRET_ACCESS_KEY", id="key-missing"),
]


@pytest.mark.parametrize("secrets, named", BROKEN)
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_a_broken_reference_is_reported_by_name_without_values(path, secrets, named, caplog):
    caplog.set_level(logging.DEBUG)
    doc = example(path)
    index = indexed_secrets(secrets)
    if doc["kind"] == "FineTuneJob":
        plan = plan_finetunejob(doc, job_world(index), CATALOG, NOW)
    else:
        plan = plan_modelserve(doc, ServeWorld(nodes=fleet(), pods=[], serve_pods=[], children={}, jobs={"fin-v1": None},
                                               secrets=index, ray_clusters={}), CATALOG, NOW)
    assert_plan_clean(plan, f"{path.name} with a broken reference")
    assert named in json.dumps(plan.status), "the status names what is missing"
    assert MARK not in caplog.text


def test_the_pods_index_keeps_no_env_values():
    """Placement's pod index holds requests, node and phase; a pod's literal env (which may carry a
    copied credential) and its volumes are dropped."""
    pod = {"metadata": {"name": "p", "namespace": NAMESPACE, "labels": {}},
           "spec": {"nodeName": "n", "containers": [{"name": "c", "env": [{"name": "TOKEN", "value": VALUES[0]}],
                                                     "resources": {"requests": {"cpu": "1"}}}],
                    "volumes": [{"name": "s", "secret": {"secretName": "hf-token"}}]},
           "status": {"phase": "Running"}}
    assert_clean(_slim_pod(pod), "the pods index")


def test_secrets_are_only_indexed_never_handled():
    """kopf logs a body (at DEBUG) only for change handlers (on.create/update/...), and the
    operator's own log lines name kind, namespace and name (controller/kubeapi.py): on Secrets the
    operator registers the key-name index and nothing else, so no Secret body is ever logged."""
    import tuneserve.controller.handlers  # noqa: F401  (registers the handlers)
    registry = kopf.get_default_registry()

    def on_secrets(sub) -> list[str]:
        return [h.id for h in sub.get_all_handlers() if h.selector and h.selector.any_name == "secrets"]
    assert on_secrets(registry._indexing) == ["secrets_index"]
    for sub in (registry._changing, registry._watching, registry._spawning, registry._webhooks):
        assert on_secrets(sub) == [], "a handler on Secrets would see (and kopf could log) their values"
