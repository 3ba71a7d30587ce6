"""The operator's writes reuse kept-alive connections (controller/apiclient.py, handlers._api_client).

An unread reply cannot go back to the connection pool, and a pool smaller than the reconcile
workers drops connections: either way every write opens a new TLS connection. In a burst of 200
FineTuneJobs that was a third of the operator's time (bench/control_loop_create.py). Here a small
HTTP server on loopback counts the client connections behind many writes.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from loopback import running_server
from tuneserve.controller.handlers import _api_client
from tuneserve.controller.kubeapi import KubeApi
from tuneserve.core.plan import Event


server = pytest.fixture(running_server)


def _writes(api: KubeApi, i: int) -> None:
    api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": "ns"}})
    api.post_event({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": "ns", "uid": "u"}},
                   Event("Normal", "Applied", "applied"))


@pytest.mark.parametrize("threads", [1, 8])
def test_writes_reuse_one_kept_alive_connection_per_worker(server, threads, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"   # the operator's client, logged in as the operator is outside a pod
    kubeconfig.write_text(json.dumps({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": server.url}}], "users": [{"name": "u", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api = KubeApi(_api_client(connections=threads))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: _writes(api, i), range(40)))
    assert len(server.seen) == 80 and {s.authorization for s in server.seen} == {"Bearer t"}
    assert len(server.peers()) <= threads, f"{len(server.peers())} connections for 80 writes from {threads} threads"


def test_error_replies_are_read_too(server):
    """A refused write (a 409, a 422 of a failed test op) must not leave its connection unusable."""
    server.respond = lambda seen: (422, {"kind": "Status", "code": 422, "details": {}})
    api = KubeApi(server.client(connections=1))
    for i in range(20):
        assert api.json_patch("ray.io/v1", "RayCluster", f"rc-{i}", "ns", [{"op": "test", "path": "/x", "value": 1}]) \
            is False
    assert len(server.peers()) == 1
