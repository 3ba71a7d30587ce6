"""A stand-in API server on loopback for the operator's HTTP client: it records every request
(method, path, query, content type, JSON body, client connection) and answers with what the test's
``respond`` returns, kept alive as the API server does."""
from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

import kopf

from tuneserve.controller.apiclient import Client


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: Optional[str]
    authorization: Optional[str]
    body: Any
    peer: tuple[str, int]
    client_cn: Optional[str] = None   # the TLS client certificate's common name


def ok(_seen: Seen) -> tuple[int, Any]:
    return 200, {"kind": "ConfigMap", "metadata": {"name": "x", "resourceVersion": "1"}, "data": {"k": "v" * 4096}}


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: Optional[ssl.SSLContext] = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.seen: list[Seen] = []
        self.respond: Callable[[Seen], tuple[int, Any]] = ok
        self.guard = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def client(self, connections: int = 4, token: Optional[str] = "t0ken") -> Client:
        return Client(kopf.ConnectionInfo(server=self.url, token=token), connections)

    def peers(self) -> set[tuple[str, int]]:
        return {s.peer for s in self.seen}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the API server
    disable_nagle_algorithm = True   # as the API server: else each reply waits out a delayed ACK

    def log_message(self, *_):
        pass

    def _handle(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        seen = Seen(self.command, url.path, parse_qs(url.query), self.headers.get("Content-Type"),
                    self.headers.get("Authorization"), json.loads(raw) if raw else None, self.client_address,
                    _common_name(self.connection))
        with self.server.guard:
            self.server.seen.append(seen)
        status, body = self.server.respond(seen)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


def _common_name(conn: object) -> Optional[str]:
    cert = conn.getpeercert() if isinstance(conn, ssl.SSLSocket) else None
    return next((v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"), None)


def serve(tls: Optional[ssl.SSLContext] = None) -> ApiServer:
    srv = ApiServer(tls)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def running_server() -> Iterator[ApiServer]:
    """A plain-HTTP loopback API server for one test (the modules' ``server`` fixture), shut after."""
    srv = serve()
    yield srv
    srv.shutdown()
    srv.server_close()
