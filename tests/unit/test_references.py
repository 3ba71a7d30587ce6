"""Every object a spec names is checked against the indexes' names, for both kinds: a missing
ServiceAccount, PersistentVolumeClaim (pvc:// URIs) or PriorityClass blocks the object (Accepted
False ReferenceNotFound, the message naming the field and the object, a Warning Event, no
children), and it proceeds once the object exists. The owner is woken by that object's event."""
from __future__ import annotations

from datetime import datetime, timezone

import kopf
import pytest

from helpers import fleet, load_example, merge_patch
from tuneserve.controller import handlers
from tuneserve.controller.indexes import _name_only
from tuneserve.controller.schedule import Schedule
from tuneserve.core.catalog import load_catalog
from tuneserve.core.references import KnownNames
from tuneserve.finetunejob.reconcile import World, plan_finetunejob
from tuneserve.modelserve.reconcile import ServeWorld, plan_modelserve

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()
SECRETS = {"hf-token": frozenset({"token"}), "bank-s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})}
ALL = KnownNames(service_accounts=frozenset({"trainer"}), claims=frozenset({"data", "models", "out", "ckpt", "adapters"}),
                 priority_classes=frozenset({"training"}))


def job(**spec):
    doc = merge_patch(load_example("finetunejob-qwen-bank.yaml"), {"spec": spec})
    doc["metadata"].update(namespace="bank", uid="uid-1", generation=1)
    return doc


def serve(**spec):
    doc = merge_patch(load_example("modelserve-qwen-bank.yaml"), {"spec": spec})
    doc["metadata"].update(uid="uid-ms", generation=1)
    return doc


def plan_job(body, known, secrets=SECRETS):
    world = World(nodes=fleet(), pods=[], job_pods=[], ray_jobs={}, children={}, progress_configmap=None,
                  secrets=secrets, known=known)
    return plan_finetunejob(body, world, CATALOG, NOW)


def plan_serve(body, known, secrets=SECRETS):
    world = ServeWorld(nodes=fleet(), pods=[], serve_pods=[], children={}, jobs={"fin-v1": None}, secrets=secrets,
                       known=known)
    return plan_modelserve(body, world, CATALOG, NOW)


def without(known: KnownNames, kind: str, name: str) -> KnownNames:
    field = {"ServiceAccount": "service_accounts", "PersistentVolumeClaim": "claims", "PriorityClass": "priority_classes"}[kind]
    return KnownNames(**{**known.__dict__, field: getattr(known, field) - {name}})


def accepted(plan):
    return next(c for c in plan.status["conditions"] if c["type"] == "Accepted")


CASES = [
    # (kind's planner, body, the missing object, the message the user reads)
    (plan_job, job(serviceAccountName="trainer"), ("ServiceAccount", "trainer"),
     "spec.serviceAccountName: ServiceAccount 'trainer' not found"),
    (plan_job, job(), ("PriorityClass", "training"), "spec.priorityClassName: PriorityClass 'training' not found"),
    (plan_job, job(dataset={"uri": "pvc://data/bank/train.jsonl"}), ("PersistentVolumeClaim", "data"),
     "spec.dataset.uri: PersistentVolumeClaim 'data' not found"),
    (plan_job, job(baseModel={"uri": "pvc://models/Qwen2.5-7B-Instruct"}), ("PersistentVolumeClaim", "models"),
     "spec.baseModel.uri: PersistentVolumeClaim 'models' not found"),
    (plan_job, job(output={"uri": "pvc://out/fin-v1"}), ("PersistentVolumeClaim", "out"),
     "spec.output.uri: PersistentVolumeClaim 'out' not found"),
    (plan_job, job(checkpoint={"uri": "pvc://ckpt/fin-v1", "intervalMinutes": 10}), ("PersistentVolumeClaim", "ckpt"),
     "spec.checkpoint.uri: PersistentVolumeClaim 'ckpt' not found"),
    (plan_serve, serve(serviceAccountName="trainer"), ("ServiceAccount", "trainer"),
     "spec.serviceAccountName: ServiceAccount 'trainer' not found"),
    (plan_serve, serve(priorityClassName="training"), ("PriorityClass", "training"),
     "spec.priorityClassName: PriorityClass 'training' not found"),
    (plan_serve, serve(baseModel={"uri": "pvc://models/Qwen2.5-7B-Instruct"}), ("PersistentVolumeClaim", "models"),
     "spec.baseModel.uri: PersistentVolumeClaim 'models' not found"),
    (plan_serve, serve(adapters=[{"name": "fin-v1", "fineTuneJobRef": {"name": "fin-v1"}},
                                 {"name": "support-v3", "uri": "pvc://adapters/support-v3"}]),
     ("PersistentVolumeClaim", "adapters"), "spec.adapters[1].uri: PersistentVolumeClaim 'adapters' not found"),
]


@pytest.mark.parametrize("plan, body, missing, message", CASES, ids=[c[3].split(":")[0] + "-" + c[0].__name__ for c in CASES])
def test_a_missing_reference_blocks_naming_the_field_then_proceeds(plan, body, missing, message):
    blocked = plan(body, without(ALL, *missing))
    assert blocked.apply == [], "no children while a reference is missing"
    assert blocked.status["phase"] == "Pending" and blocked.status["message"] == message
    assert (accepted(blocked)["status"], accepted(blocked)["reason"], accepted(blocked)["message"]) == \
        ("False", "ReferenceNotFound", message)
    assert ("Warning", "ReferenceNotFound", f"Accepted=False: {message}") in [(e.type, e.reason, e.message) for e in blocked.events]
    assert blocked.waiting_for == [missing] and blocked.requeue_after is not None

    body["status"] = blocked.status
    proceeds = plan(body, ALL)
    assert proceeds.apply, "children once it exists"
    assert (accepted(proceeds)["status"], accepted(proceeds)["reason"]) == ("True", "SpecValid")
    assert proceeds.waiting_for == []


def test_every_missing_reference_and_secret_is_named_in_one_message():
    plan = plan_job(job(serviceAccountName="trainer", dataset={"uri": "pvc://data/train.jsonl"}), KnownNames(),
                    secrets={"bank-s3": SECRETS["bank-s3"]})
    assert accepted(plan)["reason"] == "ReferenceNotFound"
    assert accepted(plan)["message"] == (
        "spec.serviceAccountName: ServiceAccount 'trainer' not found; "
        "spec.priorityClassName: PriorityClass 'training' not found; "
        "spec.dataset.uri: PersistentVolumeClaim 'data' not found; "
        "spec.credentials.huggingFaceToken: Secret 'hf-token' not found")
    assert plan.waiting_for == [("ServiceAccount", "trainer"), ("PriorityClass", "training"),
                                ("PersistentVolumeClaim", "data")]


def test_only_secrets_missing_keeps_the_secret_reason():
    plan = plan_job(job(), ALL, secrets={"bank-s3": SECRETS["bank-s3"]})
    assert (accepted(plan)["reason"], accepted(plan)["message"]) == (
        "SecretNotFound", "spec.credentials.huggingFaceToken: Secret 'hf-token' not found")
    assert plan.waiting_for == []


SECRET_CASES = [
    # credentials, the namespace's Secrets (name -> keys), the message: each reference named by its field
    ({"objectStore": {"accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"}}},
     {"s3": {"id"}}, "spec.credentials.objectStore.secretAccessKey: Secret 's3' has no key 'secret'"),
    ({"secretEnv": [{"name": "A", "secretKeyRef": {"name": "a", "key": "k"}},
                    {"name": "B", "secretKeyRef": {"name": "b", "key": "k"}}]},
     {"a": {"k"}}, "spec.credentials.secretEnv[1].secretKeyRef: Secret 'b' not found"),
    ({"huggingFaceToken": {"name": "hf", "key": "token"}, "objectStore": {
        "accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"},
        "sessionToken": {"name": "sts", "key": "t"}}},
     {"hf": {"token"}, "s3": {"id", "secret"}}, "spec.credentials.objectStore.sessionToken: Secret 'sts' not found"),
]


@pytest.mark.parametrize("credentials, secrets, message", SECRET_CASES)
@pytest.mark.parametrize("planner, make", [(plan_job, job), (plan_serve, serve)], ids=["finetunejob", "modelserve"])
def test_a_missing_secret_is_named_by_its_field(planner, make, credentials, secrets, message):
    body = make(credentials=None)
    body["spec"]["credentials"] = credentials
    plan = planner(body, ALL, secrets={k: frozenset(v) for k, v in secrets.items()})
    assert plan.apply == []
    assert (accepted(plan)["reason"], accepted(plan)["message"]) == ("SecretNotFound", message)


def test_the_name_indexes_hold_names_only():
    assert _name_only(name="data", namespace="bank", body={"spec": {"resources": {}}}) == {"bank": "data"}
    assert _name_only(name="training", namespace=None, body={"value": 1000}) == {None: "training"}


def test_an_object_appearing_wakes_only_the_owners_blocked_on_it():
    schedule = Schedule(resync_seconds=60)
    blocked, other = ("finetunejobs", "bank", "fin-v1"), ("modelserves", "bank", "bank-llm")
    for key in (blocked, other):
        schedule.planned(key, 100.0, None)
    schedule.wait_for(blocked, [("PersistentVolumeClaim", "bank", "data")])
    schedule.appeared(("PersistentVolumeClaim", "other", "data"))
    assert not schedule.due(blocked, 110.0), "a claim of the same name in another namespace wakes nothing"
    schedule.appeared(("PersistentVolumeClaim", "bank", "data"))
    assert schedule.due(blocked, 103.0) and not schedule.due(other, 110.0)


def _indexes(claims=(), priority_classes=()):
    from tuneserve.controller.indexes import CHILD_KINDS
    out = {"nodes_index": {None: fleet()}, "pods_index": {}, "rayclusters_index": {}, "finetunejobs_index": {},
           "secrets_index": {"bank": list(SECRETS.items())}, "serviceaccounts_index": {},
           "persistentvolumeclaims_index": {"bank": list(claims)}, "priorityclasses_index": {None: list(priority_classes)},
           "job_reservations_index": {}, "serve_reservations_index": {}}
    out.update({c.index_id: {} for c in CHILD_KINDS})
    return out


def test_the_controller_blocks_on_the_indexes_and_the_event_of_the_missing_object_wakes_it(monkeypatch):
    from test_controller import RecordingApi
    api = RecordingApi()
    monkeypatch.setattr(handlers.Runtime, "api", api)
    monkeypatch.setattr(handlers.Runtime, "catalog", CATALOG)
    monkeypatch.setattr(handlers.Runtime, "written", {})
    monkeypatch.setattr(handlers.Runtime, "promised", handlers.Promised())
    monkeypatch.setattr(handlers, "SCHEDULE", Schedule(resync_seconds=60))
    body = job(dataset={"uri": "pvc://data/train.jsonl"})
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", "fin-v1", "uid-1", _indexes(priority_classes=("training",)))
    assert [c[0] for c in api.calls if c[0] != "event"] == ["status"], "no children, no API read"
    assert ("event", "ReferenceNotFound", "fin-v1") in api.calls
    key = ("finetunejobs", "bank", "fin-v1")
    assert handlers.SCHEDULE._waiting[key] == {("PersistentVolumeClaim", "bank", "data")}
    seen = []
    monkeypatch.setattr(handlers.SCHEDULE, "appeared", seen.append)
    handlers._wake_blocked_on("PriorityClass")(name="training", namespace=None)
    handlers._wake_blocked_on("PersistentVolumeClaim")(name="data", namespace="bank")
    assert seen == [("PriorityClass", None, "training"), ("PersistentVolumeClaim", "bank", "data")]
