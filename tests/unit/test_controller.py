"""The controller path without a cluster: kopf's indexes as dicts, a recording KubeApi. A
reconcile reads only the indexes (no Secret GET), applies the children, writes the status,
schedules the next plan; a child's event wakes the owner."""
from __future__ import annotations

import kopf
import pytest

from helpers import fleet, load_example
from tuneserve.core.catalog import load_catalog
from tuneserve.controller import handlers
from tuneserve.controller.indexes import CHILD_KINDS, job_reservations_index
from tuneserve.controller.promised import Promised
from tuneserve.core.scheduling.reservations import Reservation


class EventReasons:
    """The reasons of the Events posted so far, read live from the recording API."""
    def __init__(self, api):
        self.api = api

    def __iter__(self):
        return iter([c[1] for c in self.api.calls if c[0] == "event"])


class RecordingApi:
    def __init__(self):
        self.calls = []
        self.versions = []
        self.conflicting = set()   # resourceVersions the API server has moved past

    def apply(self, obj):
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))

    def delete(self, api_version, kind, name, namespace):
        self.calls.append(("delete", kind, name))

    def json_patch(self, api_version, kind, name, namespace, ops):
        self.calls.append(("patch", kind, name))
        return True

    def write_status(self, plural, namespace, name, status, resource_version):
        self.calls.append(("status", plural, name))
        self.versions.append(resource_version)
        return None if resource_version in self.conflicting else f"{len(self.calls)}"

    def post_event(self, involved, event):
        self.calls.append(("event", event.reason, involved["metadata"]["name"]))

    def __getattr__(self, name):   # anything else (e.g. a Secret read) is a test failure
        raise AssertionError(f"unexpected API call {name}")


@pytest.fixture
def runtime(monkeypatch):
    api = RecordingApi()
    monkeypatch.setattr(handlers.Runtime, "api", api)
    monkeypatch.setattr(handlers.Runtime, "catalog", load_catalog())
    monkeypatch.setattr(handlers.Runtime, "written", {})
    monkeypatch.setattr(handlers.Runtime, "recent", handlers.RecentlyApplied())
    monkeypatch.setattr(handlers.Runtime, "promised", handlers.Promised())
    monkeypatch.setattr(handlers, "SCHEDULE", handlers.Schedule(resync_seconds=60))
    return api, EventReasons(api)


def _indexes(secrets, service_accounts=(), claims=(), priority_classes=("training",)):
    out = {"nodes_index": {None: fleet()}, "pods_index": {}, "rayclusters_index": {}, "finetunejobs_index": {},
           "secrets_index": {"bank": list(secrets.items())}, "serviceaccounts_index": {"bank": list(service_accounts)},
           "persistentvolumeclaims_index": {"bank": list(claims)}, "priorityclasses_index": {None: list(priority_classes)},
           "job_reservations_index": {}, "serve_reservations_index": {}}
    out.update({c.index_id: {} for c in CHILD_KINDS})
    return out


def test_a_reconcile_reads_indexes_applies_children_writes_status_and_schedules(runtime):
    api, events = runtime
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(namespace="bank", uid="uid-1", generation=1)
    secrets = {"hf-token": frozenset({"token"}), "bank-s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})}
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", body["metadata"]["name"], "uid-1", _indexes(secrets))
    kinds = [c[1] for c in api.calls if c[0] == "apply"]
    assert kinds[-1] == "RayJob" and "ConfigMap" in kinds and ("status", "finetunejobs", body["metadata"]["name"]) in api.calls
    assert "FitsNow" in events
    key = ("finetunejobs", "bank", body["metadata"]["name"])
    now = handlers.time.monotonic()
    assert not handlers.SCHEDULE.due(key, now), "Pending: planned again in react seconds, not at once"
    assert handlers.SCHEDULE.due(key, now + handlers.SCHEDULE.react + 0.1)


def test_a_missing_secret_in_the_index_blocks_without_any_api_read(runtime):
    api, events = runtime
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(namespace="bank", uid="uid-2", generation=1)
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", body["metadata"]["name"], "uid-2", _indexes({}))
    assert [c[0] for c in api.calls if c[0] != "event"] == ["status"]
    assert list(events) == ["SecretNotFound", "FitsNow"]


def test_a_child_event_wakes_its_owner(runtime):
    key = ("finetunejobs", "bank", "fin-v1")
    handlers.SCHEDULE.planned(key, 100.0, None)
    handlers._wake_owner(namespace="bank", labels={"tuneserve.dev/finetunejob": "fin-v1"})
    assert not handlers.SCHEDULE.due(key, 102.0) and handlers.SCHEDULE.due(key, 103.0), "woken: react seconds after its last plan"


def bank_body(uid="uid-3", version="7"):
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(namespace="bank", uid=uid, generation=1, resourceVersion=version)
    return body


SECRETS = {"hf-token": frozenset({"token"}), "bank-s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})}


def test_the_status_is_written_first_against_the_version_it_was_planned_from(runtime):
    """The attempt is recorded before its RayJob exists: a crash after any write converges."""
    api, _ = runtime
    body = bank_body()
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", "fin-v1", "uid-3", _indexes(SECRETS))
    order = [c[0] for c in api.calls]
    assert order[0] == "status" and order.index("status") < order.index("apply") and api.versions == ["7"]
    assert order.index("event") < order.index("apply"), "the transition's Events go with its status"


def test_a_status_conflict_writes_no_child_and_the_next_copy_is_planned_fresh(runtime):
    api, events = runtime
    api.conflicting.add("7")
    handlers.reconcile_finetunejob(kopf.Body(bank_body()), "bank", "fin-v1", "uid-3", _indexes(SECRETS))
    assert [c[0] for c in api.calls] == ["status"] and list(events) == [], "nothing after a refused status write"
    api.calls.clear()
    handlers.reconcile_finetunejob(kopf.Body(bank_body(version="8")), "bank", "fin-v1", "uid-3", _indexes(SECRETS))
    assert api.versions[-1] == "8" and "apply" in [c[0] for c in api.calls]


def test_a_body_from_before_the_last_write_is_planned_with_that_write(runtime):
    """The watch has not delivered the operator's own write yet: planning the stale copy would
    post the same transition's Events again (and could re-render an attempt it moved past)."""
    api, events = runtime
    handlers.reconcile_finetunejob(kopf.Body(bank_body()), "bank", "fin-v1", "uid-3", _indexes(SECRETS))
    first = list(events)
    api.calls.clear()
    handlers.reconcile_finetunejob(kopf.Body(bank_body()), "bank", "fin-v1", "uid-3", _indexes(SECRETS))
    assert first and list(events) == [] and "status" not in [c[0] for c in api.calls]


def test_a_second_plan_before_the_watch_delivers_the_children_applies_none_again(runtime):
    """A new job is planned on ADDED and again on its own status write's MODIFIED, before the
    children reach the indexes: the second plan must not apply them all again."""
    api, _ = runtime
    handlers.reconcile_finetunejob(kopf.Body(bank_body()), "bank", "fin-v1", "uid-4", _indexes(SECRETS))
    applied = [c for c in api.calls if c[0] == "apply"]
    assert applied
    api.calls.clear()
    handlers.Runtime.written.clear()            # as if the status write's MODIFIED event arrived
    handlers.reconcile_finetunejob(kopf.Body(bank_body(version="8")), "bank", "fin-v1", "uid-4", _indexes(SECRETS))
    assert [c for c in api.calls if c[0] == "apply"] == []


def test_the_resync_loop_plans_due_objects_from_the_index_and_forgets_deleted_ones(runtime, monkeypatch):
    api, _ = runtime
    indexes = _indexes(SECRETS)
    indexes["finetunejobs_index"] = {("bank", "fin-v1"): [bank_body()]}
    indexes["modelserves_index"] = {}
    monkeypatch.setattr(handlers.Runtime, "indexes", indexes)
    loop = handlers.ResyncLoop(handlers.SCHEDULE, handlers.plan_due)
    here, gone = ("finetunejobs", "bank", "fin-v1"), ("modelserves", "bank", "deleted-llm")
    handlers.SCHEDULE.wake(here)
    handlers.SCHEDULE.wake(gone)
    assert loop.run_once(handlers.time.monotonic()) == 2
    assert ("status", "finetunejobs", "fin-v1") in api.calls
    assert handlers.SCHEDULE.due_keys(handlers.time.monotonic()) == [], "planned again later; the deleted one forgotten"


def test_no_handler_needs_a_finalizer():
    """No kopf timers or deletion handlers: an object deleted while the operator is down goes at
    once, and kopf removes the finalizer earlier versions added."""
    registry = kopf.get_default_registry()
    assert not registry._spawning.get_all_handlers()   # timers, daemons
    assert not registry._changing.get_all_handlers()                                   # create/update/delete


def burst_body(name):
    body = bank_body(uid=f"uid-{name}")
    body["metadata"]["name"] = name
    return body


def test_a_burst_planned_before_the_watch_delivers_any_status_does_not_overcommit(runtime):
    """Issue 15: jobs created together are planned before any of their statuses reaches the
    reservation indexes; what the earlier plans placed counts (two 8-device H100 nodes, 1x8 jobs)."""
    pools = []
    for name in ("burst-0", "burst-1", "burst-2"):
        handlers.reconcile_finetunejob(kopf.Body(burst_body(name)), "bank", name, f"uid-{name}", _indexes(SECRETS))
        pools.append(handlers.Runtime.written[f"uid-{name}"][0]["placement"]["pool"])
    assert pools == ["h100", "h100", "mi300x"]
    handlers._deleted("finetunejobs", kopf.Body(burst_body("burst-0")), "DELETED")
    handlers.reconcile_finetunejob(kopf.Body(burst_body("burst-3")), "bank", "burst-3", "uid-burst-3", _indexes(SECRETS))
    assert handlers.Runtime.written["uid-burst-3"][0]["placement"]["pool"] == "h100", "a deleted job reserves nothing"


def test_the_reservation_indexes_hold_placed_objects_only(runtime):
    api, _ = runtime
    body = bank_body()
    assert job_reservations_index(kopf.Body(body)) == {}
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", "fin-v1", "uid-3", _indexes(SECRETS))
    placed = {**body, "status": handlers.Runtime.written["uid-3"][0]}
    (reservation,) = job_reservations_index(kopf.Body(placed)).values()
    assert reservation.owner == ("FineTuneJob", "bank", "fin-v1") and reservation.pool == "h100"


def test_what_was_planned_overrides_what_the_indexes_saw():
    promised = Promised()
    a = Reservation(("FineTuneJob", "bank", "a"), "h100", "nvidia/h100-80gb", 1, 8)
    b = Reservation(("ModelServe", "bank", "b"), "h100", "nvidia/h100-80gb", 1, 8)
    promised.record(a.owner, None)       # a's last plan finished it: the index has not seen that yet
    promised.record(b.owner, b)          # b was placed a moment ago: the index has not seen it yet
    assert promised.merged([a]) == (b,)
    promised.forget(a.owner)
    assert promised.merged([a]) == (a, b)


class CountingIndex(dict):
    """A kopf index as a dict that counts the cluster-wide reads (key None: every node, pod, reservation)."""
    def __init__(self, *args):
        super().__init__(*args)
        self.reads = 0

    def get(self, key, default=None):
        self.reads += key is None
        return super().get(key, default)


def test_a_placed_job_planned_again_reads_no_cluster_wide_list(runtime):
    """At rest most plans are the resync's, of settled objects: they must not pay for a list of
    every pod, node and reservation, which only placement reads (at 1,000 jobs: most of a plan)."""
    api, _ = runtime
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(namespace="bank", uid="uid-lazy", generation=1)
    secrets = {"hf-token": frozenset({"token"}), "bank-s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})}
    indexes = _indexes(secrets)
    wide = ("nodes_index", "pods_index", "job_reservations_index", "serve_reservations_index")
    indexes.update({name: CountingIndex(indexes[name]) for name in wide})
    name = body["metadata"]["name"]
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", name, "uid-lazy", indexes)
    assert indexes["nodes_index"].reads == 1 and indexes["pods_index"].reads == 1, "the first plan places"
    placed = {**body, "status": handlers.Runtime.written["uid-lazy"][0]}
    handlers.reconcile_finetunejob(kopf.Body(placed), "bank", name, "uid-lazy", indexes)
    assert [indexes[n].reads for n in wide] == [1, 1, 1, 1]
    assert placed["status"]["placement"]["attempt"] == 1


def _node(allocatable_gpus: str, heartbeat: str) -> dict:
    return {"metadata": {"name": "h100-a", "labels": {"tuneserve.dev/pool": "h100"}}, "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": allocatable_gpus},
                       "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]}}


def test_waiting_objects_wake_when_a_pod_finishes_or_a_node_offers_more_not_on_heartbeats(runtime, monkeypatch):
    monkeypatch.setattr(handlers.Runtime, "node_offers", {})
    key = ("finetunejobs", "bank", "waiting")
    handlers.node_capacity(kopf.Body(_node("8", "t0")), "h100-a", "ADDED")
    handlers.SCHEDULE.planned(key, handlers.time.monotonic(), None, settled=False, for_capacity=True)
    later = handlers.time.monotonic() + handlers.SCHEDULE.react + 0.1

    handlers.node_capacity(kopf.Body(_node("8", "t1")), "h100-a", "MODIFIED")   # a heartbeat
    handlers.pod_capacity(kopf.Body({"metadata": {"name": "p"}, "status": {"phase": "Running"}}), "MODIFIED")
    assert not handlers.SCHEDULE.due(key, later)

    handlers.pod_capacity(kopf.Body({"metadata": {"name": "p"}, "status": {"phase": "Succeeded"}}), "MODIFIED")
    assert handlers.SCHEDULE.due(key, later), "a finished pod frees its node"

    handlers.SCHEDULE.planned(key, handlers.time.monotonic(), None, settled=False, for_capacity=True)
    later = handlers.time.monotonic() + handlers.SCHEDULE.react + 0.1
    assert not handlers.SCHEDULE.due(key, later)
    handlers.node_capacity(kopf.Body(_node("16", "t2")), "h100-a", "MODIFIED")
    assert handlers.SCHEDULE.due(key, later), "the node offers more devices"
