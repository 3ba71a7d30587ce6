"""Stale replica reports are pruned from ``<ms>-serve-status``: the reports of replicas gone for
longer than report.PRUNE_AFTER_SECONDS go, in one merge patch guarded by the resourceVersion it
was planned from; a conflict re-reads and re-plans, so a report refreshed meanwhile stays."""
from __future__ import annotations

import io
import json
import urllib.error
from datetime import datetime, timedelta, timezone

import pytest

from tuneserve_workers import kube
from tuneserve_workers.serve import report
from tuneserve_workers.serve.report import PRUNE_AFTER_SECONDS, prune_stale_reports, stale_report_keys

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def doc(replica: str, age_s: float, state: str = "Ready") -> str:
    return json.dumps({"replica_id": replica, "state": state,
                       "updated_at": (NOW - timedelta(seconds=age_s)).isoformat()})


DATA = {
    "replica.live.json": doc("live", 10),
    "replica.failed-recently.json": doc("failed-recently", 600, "Failed"),  # the operator still shows it
    "replica.gone.json": doc("gone", PRUNE_AFTER_SECONDS + 1),
    "replica.gone-long-ago.json": doc("gone-long-ago", 30 * 86400, "Stopping"),
    "replica.unreadable.json": "{not json",                                 # another version's: kept
    "adapters.json": doc("not-a-report", 30 * 86400),                       # not a report key: kept
}


def test_only_reports_older_than_the_bound_are_stale():
    assert PRUNE_AFTER_SECONDS >= 2 * report.contract.SERVE_FAILURE_REPORT_SECONDS
    assert stale_report_keys(DATA, NOW) == ["replica.gone-long-ago.json", "replica.gone.json"]
    assert stale_report_keys({"replica.x.json": doc("x", PRUNE_AFTER_SECONDS)}, NOW) == []


class FakeConfigMap(kube.ConfigMap):
    """The API server's side of one ConfigMap: merge patches, resourceVersion checks (409)."""

    def __init__(self, data: dict, before_write=None):
        super().__init__("team-a/bank-serve-status", sa_dir="/nonexistent", api="https://unused")
        self.data, self.version, self.patches = dict(data), 7, []
        self.before_write = before_write or (lambda cm: None)

    def _call(self, method, body=None):
        if method == "GET":
            return json.dumps({"metadata": {"resourceVersion": str(self.version)}, "data": self.data}).encode()
        self.before_write(self)
        self.patches.append(body)
        if body["metadata"]["resourceVersion"] != str(self.version):
            raise urllib.error.HTTPError("https://unused", 409, "Conflict", {}, io.BytesIO(b"{}"))
        for key, value in body["data"].items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
        self.version += 1
        return b"{}"


def test_prune_deletes_stale_reports_in_one_guarded_patch():
    cm = FakeConfigMap(DATA)
    assert prune_stale_reports(cm, lambda: NOW) == ["replica.gone-long-ago.json", "replica.gone.json"]
    assert cm.patches == [{"metadata": {"resourceVersion": "7"},
                           "data": {"replica.gone-long-ago.json": None, "replica.gone.json": None}}]
    assert sorted(cm.data) == ["adapters.json", "replica.failed-recently.json", "replica.live.json",
                               "replica.unreadable.json"]
    assert prune_stale_reports(cm, lambda: NOW) == [] and len(cm.patches) == 1   # nothing stale: no write


def test_a_report_refreshed_while_pruning_is_kept():
    """The 'gone' replica comes back between the read and the write: the patch conflicts, the
    re-read sees its fresh report, and only the other stale one is deleted."""
    def comeback(cm):
        if len(cm.patches) == 0:
            cm.data["replica.gone.json"] = doc("gone", 0)
            cm.version += 1
    cm = FakeConfigMap(DATA, before_write=comeback)
    assert prune_stale_reports(cm, lambda: NOW) == ["replica.gone-long-ago.json"]
    assert [p["metadata"]["resourceVersion"] for p in cm.patches] == ["7", "8"]
    assert "replica.gone.json" in cm.data and "replica.gone-long-ago.json" not in cm.data


def test_conflicts_every_time_give_up_without_deleting():
    def busy(cm):
        cm.version += 1
    cm = FakeConfigMap(DATA, before_write=busy)
    assert prune_stale_reports(cm, lambda: NOW, attempts=3) == []
    assert len(cm.patches) == 3 and cm.data == DATA


def test_the_publisher_prunes_once_per_interval(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(report.time, "monotonic", lambda: clock[0])
    calls = []

    class Sink:
        def write(self, key, doc):
            pass

        def prune(self):
            calls.append(clock[0])
            return []
    pub = report.StatusPublisher("r1", lambda: "{}")
    pub.sinks = [Sink()]
    for t in (1000.0, 1100.0, 1000.0 + report.PRUNE_INTERVAL_SECONDS, 1400.0, 1700.0):
        clock[0] = t
        pub.publish_now()
    assert calls == [1000.0 + report.PRUNE_INTERVAL_SECONDS, 1700.0]


def test_other_http_errors_are_not_conflicts():
    cm = FakeConfigMap(DATA)

    def refuse(method, body=None):
        if method == "GET":
            return FakeConfigMap._call(cm, method, body)
        raise urllib.error.HTTPError("https://unused", 403, "Forbidden", {}, io.BytesIO(b"{}"))
    cm._call = refuse
    with pytest.raises(urllib.error.HTTPError):
        prune_stale_reports(cm, lambda: NOW)
