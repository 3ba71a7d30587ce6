"""The operator's writes reuse kept-alive connections (controller/kubeapi.py, handlers._api_client).

An unread reply cannot go back to the connection pool, and a pool smaller than the reconcile
workers drops connections: either way every write opens a new TLS connection. In a burst of 200
FineTuneJobs that was a third of the operator's time (bench/control_loop_create.py). Here a small
HTTP server on loopback counts the client connections behind many writes.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from tuneserve.controller.handlers import _api_client
from tuneserve.controller.kubeapi import KubeApi
from tuneserve.core.plan import Event

DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "configmaps", "singularName": "configmap", "namespaced": True, "kind": "ConfigMap",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}]},
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.peers: set[tuple[str, int]] = set()
        self.writes = 0
        self.guard = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the API server

    def log_message(self, *_):
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _count(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.guard:
            self.server.peers.add(self.client_address)
            self.server.writes += 1

    def do_GET(self):
        self._reply(DISCOVERY.get(self.path.split("?")[0], {}))

    def do_PATCH(self):
        self._count()
        self._reply({"kind": "ConfigMap", "metadata": {"name": "x", "resourceVersion": "1"}, "data": {"k": "v" * 4096}})

    do_POST = do_PATCH


@pytest.fixture()
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _api(server, connections: int) -> KubeApi:
    client.Configuration.set_default(client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        return KubeApi(_api_client(connections))
    finally:
        client.Configuration.set_default(None)


def _writes(api: KubeApi, i: int) -> None:
    api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": "ns"}})
    api.post_event({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": "ns", "uid": "u"}},
                   Event("Normal", "Applied", "applied"))


@pytest.mark.parametrize("threads", [1, 8])
def test_writes_reuse_one_kept_alive_connection_per_worker(server, threads):
    api = _api(server, connections=threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: _writes(api, i), range(40)))
    assert server.writes == 80
    assert len(server.peers) <= threads, f"{len(server.peers)} connections for 80 writes from {threads} threads"
