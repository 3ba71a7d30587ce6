"""A small synchronous client of the Kubernetes API on urllib3, for the operator's own writes and
the Lease (kubeapi.py, leader.py). Not the `kubernetes` package: importing it cost the operator
~55 MiB of its resident memory for the five request shapes it sends (issue 15).

Credentials are kopf's ``ConnectionInfo`` (``connection_info``: the service account in a pod,
else the kubeconfig), the same that kopf's own watches use (handlers.login). Every reply is read
whole, which returns its connection to the pool: the next request reuses it instead of a new TLS
handshake (tests/unit/test_kubeapi_connections.py)."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlencode, urlsplit

import kopf
import urllib3

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0   # a projected service-account token is rotated by the kubelet
TIMEOUT = urllib3.Timeout(connect=10.0, read=60.0)   # a hung write must not hold a worker forever
RETRIES = urllib3.Retry(total=3, redirect=0)   # urllib3's default, as the `kubernetes` client had: connection
# errors, and read errors of idempotent methods (GET, PUT, DELETE; not PATCH or POST)

JSON = "application/json"
APPLY_PATCH = "application/apply-patch+yaml"   # server-side apply; JSON is YAML
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """A reply of status >= 400, or none at all (status 0: connection refused, TLS, timeout)."""

    def __init__(self, status: int, reason: str, body: str = ""):
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body = status, reason, body

    def causes(self) -> list:
        """The Status reply's details.causes (why a field was rejected); [] when it has none."""
        try:
            return ((json.loads(self.body or "{}") or {}).get("details") or {}).get("causes") or []
        except (ValueError, AttributeError):
            return []


def connection_info(settings: Optional[kopf.OperatorSettings] = None) -> kopf.ConnectionInfo:
    """The service account when running in a pod (the API server from KUBERNETES_SERVICE_HOST/PORT,
    as client-go does), else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    settings = settings or kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings)
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if info is not None and host:
        host = f"[{host}]" if ":" in host else host
        return dataclasses.replace(info, server=f"https://{host}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}")
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service-account token and no kubeconfig ($KUBECONFIG or ~/.kube/config)")
    return info


def _pem(data: str | bytes) -> bytes:
    """kubeconfig's *-data fields are base64 of PEM."""
    return base64.b64decode(data)


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    """Server verification (CA file or data, or none when insecure) and the client certificate."""
    ctx = ssl.create_default_context(cafile=os.fspath(info.ca_path) if info.ca_path else None,
                                     cadata=_pem(info.ca_data).decode() if info.ca_data else None)
    if info.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if info.certificate_path or info.certificate_data:
        with tempfile.TemporaryDirectory() as tmp:   # load_cert_chain reads files only; gone once loaded
            cert, key = info.certificate_path, info.private_key_path
            if info.certificate_data:
                cert = Path(tmp, "tls.crt")
                cert.write_bytes(_pem(info.certificate_data))
            if info.private_key_data:
                key = Path(tmp, "tls.key")
                key.write_bytes(_pem(info.private_key_data))
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    return ctx


class Client:
    """JSON requests to one API server through a pool of ``connections`` kept-alive connections
    (one per thread that writes concurrently; more are opened when needed and then dropped)."""

    def __init__(self, info: kopf.ConnectionInfo, connections: int, token_file: Optional[Path] = None):
        url = urlsplit(info.server)
        self.prefix = url.path.rstrip("/")
        tls = {"ssl_context": ssl_context(info)} if url.scheme == "https" else {}
        self.pool = urllib3.connection_from_url(f"{url.scheme}://{url.netloc}", maxsize=connections, block=False,
                                                timeout=TIMEOUT, retries=RETRIES, **tls)
        self.info, self.token_file = info, token_file
        self._token = (info.token, time.monotonic())
        self._guard = threading.Lock()

    @classmethod
    def from_environment(cls, connections: int) -> "Client":
        """From ``connection_info``; in a pod the token is read again as the kubelet rotates it."""
        token_file = SERVICE_ACCOUNT / "token"
        return cls(connection_info(), connections, token_file=token_file if token_file.exists() else None)

    def _headers(self, content_type: Optional[str]) -> dict[str, str]:
        headers = {"Accept": JSON, **({"Content-Type": content_type} if content_type else {})}
        if self.info.username and self.info.password:
            headers.update(urllib3.make_headers(basic_auth=f"{self.info.username}:{self.info.password}"))
        elif token := self.token():   # read once: it takes the lock and may read the token file
            headers["Authorization"] = f"{self.info.scheme or 'Bearer'} {token}"
        return headers

    def token(self) -> Optional[str]:
        """The bearer token, read again from the service account's file once a minute."""
        with self._guard:
            token, read_at = self._token
            if self.token_file is not None and time.monotonic() - read_at >= TOKEN_REREAD_SECONDS:
                try:
                    self._token = (self.token_file.read_text().strip() or token, time.monotonic())
                except OSError:
                    pass   # keep the last one; the API server says 401 if it is really gone
            return self._token[0]

    def request(self, method: str, path: str, body: Any = None, content_type: str = JSON,
                query: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
        """The reply's JSON object ({} when empty). Raises ApiError for status >= 400 or no reply.
        ``content_type`` is sent with a body only (JSON unless a patch or apply says otherwise)."""
        url = self.prefix + path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        try:
            reply = self.pool.request(method, url, body=data, headers=self._headers(content_type if data else None))
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, f"no reply: {exc}") from exc
        text = reply.data.decode("utf-8", "replace")   # read whole: its connection goes back to the pool
        if reply.status >= 400:
            raise ApiError(reply.status, reply.reason or "", text)
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {}


def object_path(api_version: str, plural: str, namespace: Optional[str], name: Optional[str] = None,
                subresource: Optional[str] = None) -> str:
    """/api/v1/... for the core group, /apis/<group>/<version>/... for the others."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base] + ([f"namespaces/{namespace}"] if namespace else []) + [plural] + ([name] if name else []) \
        + ([subresource] if subresource else [])
    return "/".join(parts)
