"""The progress channel: progress.json beside the checkpoints and the ConfigMap over HTTPS."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneserve_workers.contract import PROGRESS_KEY, Progress
from tuneserve_workers.train.progress import ConfigMapSink, Reporter

pytestmark = pytest.mark.worker


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "tls.crt", tmp_path / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture
def fake_apiserver(tmp_path):
    """An HTTPS endpoint that records ConfigMap patches, like the API server would receive them."""
    crt, key = _self_signed(tmp_path)
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_GET(self):
            seen.append({"path": self.path, "headers": dict(self.headers), "body": None})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"data": {"adapters.json": "[]"}}).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("s3cr3t-token\n")
    (sa / "ca.crt").write_bytes(crt.read_bytes())
    try:
        yield server, seen, sa
    finally:
        server.shutdown()
        server.server_close()


def test_progress_reaches_the_configmap_with_the_service_account_token(fake_apiserver, tmp_path,
                                                                       monkeypatch):
    server, seen, sa = fake_apiserver
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    reporter = Reporter(str(tmp_path / "ckpt"), sink=ConfigMapSink("team-a/job1-progress", sa_dir=str(sa)),
                        min_interval_s=0)
    reporter.update(state="Running", step=3, total_steps=10, loss=2.5)

    assert len(seen) == 1
    req = seen[0]
    assert req["path"] == "/api/v1/namespaces/team-a/configmaps/job1-progress"
    assert req["headers"]["Authorization"] == "Bearer s3cr3t-token"
    assert req["headers"]["Content-Type"] == "application/merge-patch+json"
    sent = Progress.model_validate_json(req["body"]["data"][PROGRESS_KEY])
    assert (sent.state, sent.step, sent.total_steps, sent.loss) == ("Running", 3, 10, 2.5)
    on_disk = Progress.model_validate_json((tmp_path / "ckpt" / "progress.json").read_text())
    assert on_disk.step == 3


def test_reporting_failures_never_stop_training(fake_apiserver, tmp_path, monkeypatch):
    server, seen, sa = fake_apiserver
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    server.shutdown()
    server.server_close()                         # the API server is gone
    reporter = Reporter(str(tmp_path / "ckpt"),
                        sink=ConfigMapSink("ns/cm", sa_dir=str(sa), timeout_s=1), min_interval_s=0)
    reporter.update(state="Running", step=4)      # must not raise
    assert Progress.model_validate_json((tmp_path / "ckpt" / "progress.json").read_text()).step == 4

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    Reporter(str(blocked / "ckpt"), min_interval_s=0).update(state="Running", step=5)  # must not raise


def test_progress_and_serve_report_share_one_kube_client_and_its_service_account_override(
        fake_apiserver, monkeypatch):
    from tuneserve_workers import kube
    from tuneserve_workers.serve.report import ConfigMapKeySink, ConfigMapKeySource
    server, seen, sa = fake_apiserver
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    monkeypatch.setenv(kube.SA_DIR_ENV, str(sa))          # no sa_dir argument anywhere below
    calls = []
    real_call = kube.ConfigMap._call
    monkeypatch.setattr(kube.ConfigMap, "_call",
                        lambda self, *a: calls.append(type(self).__name__) or real_call(self, *a))

    assert kube.in_cluster()
    ConfigMapSink("team-a/job1-progress").write('{"step": 1}')
    ConfigMapKeySink("team-a/ms-serve-status").write("replica.a.json", '{"state": "Ready"}')
    assert ConfigMapKeySource("team-a/ms-adapters", "adapters.json").read() == b"[]"

    assert calls == ["ConfigMapSink", "ConfigMapKeySink", "ConfigMapKeySource"]
    assert [r["headers"]["Authorization"] for r in seen] == ["Bearer s3cr3t-token"] * 3
    assert [r["path"].rsplit("/", 1)[1] for r in seen] == ["job1-progress", "ms-serve-status", "ms-adapters"]
    assert seen[0]["body"] == {"data": {PROGRESS_KEY: '{"step": 1}'}}
    assert seen[1]["body"] == {"data": {"replica.a.json": '{"state": "Ready"}'}}
