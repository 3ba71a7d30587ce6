"""The controller path without a cluster: kopf's indexes as dicts, a recording KubeApi. A
reconcile reads only the indexes (no Secret GET), applies the children, writes the status,
schedules the next plan; a child's event wakes the owner."""
from __future__ import annotations

import kopf
import pytest

from helpers import fleet, load_example
from tuneserve.core.catalog import load_catalog
from tuneserve.controller import handlers
from tuneserve.controller.indexes import CHILD_KINDS


class RecordingApi:
    def __init__(self):
        self.calls = []

    def apply(self, obj):
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))

    def delete(self, api_version, kind, name, namespace):
        self.calls.append(("delete", kind, name))

    def json_patch(self, api_version, kind, name, namespace, ops):
        self.calls.append(("patch", kind, name))
        return True

    def write_status(self, plural, namespace, name, status):
        self.calls.append(("status", plural, name))

    def __getattr__(self, name):   # anything else (e.g. a Secret read) is a test failure
        raise AssertionError(f"unexpected API call {name}")


@pytest.fixture
def runtime(monkeypatch):
    api = RecordingApi()
    events = []
    monkeypatch.setattr(handlers.Runtime, "api", api)
    monkeypatch.setattr(handlers.Runtime, "catalog", load_catalog())
    monkeypatch.setattr(handlers.Runtime, "written", {})
    monkeypatch.setattr(handlers, "SCHEDULE", handlers.Schedule(resync_seconds=60))
    monkeypatch.setattr(kopf, "event", lambda body, **kw: events.append(kw["reason"]))
    return api, events


def _indexes(secrets):
    out = {"nodes_index": {None: fleet()}, "pods_index": {}, "rayclusters_index": {}, "finetunejobs_index": {},
           "secrets_index": {"bank": list(secrets.items())}}
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
    api, _ = runtime
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(namespace="bank", uid="uid-2", generation=1)
    handlers.reconcile_finetunejob(kopf.Body(body), "bank", body["metadata"]["name"], "uid-2", _indexes({}))
    assert [c[0] for c in api.calls] == ["status"]


def test_a_child_event_wakes_its_owner(runtime):
    key = ("finetunejobs", "bank", "fin-v1")
    handlers.SCHEDULE.planned(key, 100.0, None)
    handlers._wake_owner(namespace="bank", labels={"tuneserve.dev/finetunejob": "fin-v1"})
    assert not handlers.SCHEDULE.due(key, 102.0) and handlers.SCHEDULE.due(key, 103.0), "woken: react seconds after its last plan"
