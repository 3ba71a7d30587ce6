"""The operator's own API client (controller/apiclient.py) and the writes on it (kubeapi.py,
leader.py), against a stand-in API server on loopback: the requests the API server sees (method,
path, content type, field manager) and what each error reply turns into."""
from __future__ import annotations

import base64
import importlib.util
import json
import ssl
import subprocess
import sys
from datetime import datetime, timezone

import kopf
import pytest

from helpers import REPO
from loopback import Seen, running_server, serve
from tuneserve import FIELD_MANAGER
from tuneserve.controller.apiclient import ApiError, Client, connection_info
from tuneserve.controller.kubeapi import KubeApi
from tuneserve.controller.leader import LeaderElector
from tuneserve.core.plan import Event

CM = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "ns"}, "data": {"a": "b"}}
JOB = {"apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u"}}


server = pytest.fixture(running_server)


def _status(code: int, causes: list | None = None):
    body = {"kind": "Status", "code": code, "message": "no", "details": {"causes": causes} if causes else {}}
    return lambda seen: (code, body)


def test_apply_is_a_forced_server_side_apply_with_the_operators_field_manager(server):
    KubeApi(server.client()).apply(CM)
    seen = server.seen[-1]
    assert (seen.method, seen.path, seen.content_type) == ("PATCH", "/api/v1/namespaces/ns/configmaps/cm",
                                                           "application/apply-patch+yaml")
    assert seen.query == {"fieldManager": [FIELD_MANAGER], "force": ["true"]}
    assert seen.body == CM and seen.authorization == "Bearer t0ken"


def test_apply_of_a_grouped_kind_goes_to_its_group(server):
    KubeApi(server.client()).apply({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "r", "namespace": "ns"}})
    assert server.seen[-1].path == "/apis/ray.io/v1/namespaces/ns/rayjobs/r"


def test_a_kind_the_operator_does_not_write_is_a_clear_error(server):
    with pytest.raises(ValueError, match="Deployment"):
        KubeApi(server.client()).apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}})
    assert server.seen == []


def test_delete_is_background_and_a_missing_object_is_no_error(server):
    api = KubeApi(server.client())
    api.delete("ray.io/v1", "RayJob", "r", "ns")
    seen = server.seen[-1]
    assert (seen.method, seen.path, seen.body["propagationPolicy"]) == ("DELETE", "/apis/ray.io/v1/namespaces/ns/rayjobs/r",
                                                                         "Background")
    server.respond = _status(404)
    api.delete("ray.io/v1", "RayJob", "r", "ns")
    server.respond = _status(403)
    with pytest.raises(ApiError) as err:
        api.delete("ray.io/v1", "RayJob", "r", "ns")
    assert err.value.status == 403 and json.loads(err.value.body)["message"] == "no"


@pytest.mark.parametrize("respond, outcome", [
    (None, True),
    (_status(404), False),                                   # gone
    (_status(422), False),                                   # a test op failed: bare 422
    (_status(422, [{"field": "spec.x", "reason": "FieldValueInvalid"}]), ApiError),   # rejected by the schema
    (_status(500), ApiError),
])
def test_json_patch(server, respond, outcome):
    if respond:
        server.respond = respond
    api = KubeApi(server.client())
    ops = [{"op": "test", "path": "/spec/x", "value": 1}, {"op": "replace", "path": "/spec/x", "value": 2}]
    if outcome is ApiError:
        with pytest.raises(ApiError):
            api.json_patch("ray.io/v1", "RayCluster", "rc", "ns", ops)
    else:
        assert api.json_patch("ray.io/v1", "RayCluster", "rc", "ns", ops) is outcome
    assert server.seen[-1].content_type == "application/json-patch+json" and server.seen[-1].body == ops


def test_status_write_is_guarded_by_the_planned_resource_version_and_returns_the_new_one(server):
    server.respond = lambda seen: (200, {"metadata": {"resourceVersion": "43"}})
    api = KubeApi(server.client())
    assert api.write_status("finetunejobs", "ns", "j", {"phase": "Pending"}, "42") == "43"
    seen = server.seen[-1]
    assert seen.path == "/apis/tuneserve.dev/v1alpha1/namespaces/ns/finetunejobs/j/status"
    assert seen.body == [{"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                         {"op": "add", "path": "/status", "value": {"phase": "Pending"}}]
    for refused in (_status(409), _status(422)):
        server.respond = refused
        assert api.write_status("finetunejobs", "ns", "j", {"phase": "Pending"}, "42") is None
    server.respond = _status(422, [{"field": "status.phase"}])
    with pytest.raises(ApiError):
        api.write_status("finetunejobs", "ns", "j", {"phase": "Nope"}, "42")


def test_events_never_raise(server):
    api = KubeApi(server.client())
    api.post_event(JOB, Event("Warning", "Placed", "m" * 2000))
    seen = server.seen[-1]
    assert (seen.method, seen.path) == ("POST", "/api/v1/namespaces/ns/events")
    assert seen.body["involvedObject"]["uid"] == "u" and len(seen.body["message"]) == 1024
    datetime.strptime(seen.body["firstTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    server.respond = _status(500)
    api.post_event(JOB, Event("Normal", "Placed", "m"))
    unreachable = KubeApi(Client(kopf.ConnectionInfo(server="http://127.0.0.1:1"), 1))
    unreachable.post_event(JOB, Event("Normal", "Placed", "m"))


def test_no_reply_is_an_api_error_of_status_zero():
    with pytest.raises(ApiError) as err:
        Client(kopf.ConnectionInfo(server="http://127.0.0.1:1"), 1).request("GET", "/api")
    assert err.value.status == 0


class _LeaseStore:
    """The Lease's one object, with the resourceVersion check of a PUT."""
    def __init__(self):
        self.lease = None

    def __call__(self, seen: Seen):
        if seen.method == "GET":
            return (200, self.lease) if self.lease else (404, {"kind": "Status", "code": 404})
        version = (self.lease or {}).get("metadata", {}).get("resourceVersion")
        if (seen.method == "POST") == (self.lease is not None) or seen.body["metadata"].get("resourceVersion") != version:
            return 409, {"kind": "Status", "code": 409}
        self.lease = {**seen.body, "metadata": {**seen.body["metadata"], "resourceVersion": str(int(version or 0) + 1)}}
        return 200, self.lease


def test_leader_creates_renews_and_releases_the_lease(server):
    server.respond = store = _LeaseStore()
    now = datetime(2026, 12, 3, 8, 0, 0, tzinfo=timezone.utc)
    me = LeaderElector(server.client(), "tuneserve-system", "lease", "me", clock=lambda: now)
    peer = LeaderElector(server.client(), "tuneserve-system", "lease", "peer", clock=lambda: now)
    assert me.try_once() and server.seen[1].method == "POST"
    assert server.seen[1].path == "/apis/coordination.k8s.io/v1/namespaces/tuneserve-system/leases"
    assert not peer.try_once()                                 # held by a live peer
    assert me.try_once() and server.seen[-1].method == "PUT"   # renewed
    assert store.lease["spec"]["holderIdentity"] == "me" and store.lease["metadata"]["resourceVersion"] == "2"
    me.release()
    assert store.lease["spec"]["holderIdentity"] == "" and store.lease["spec"]["leaseDurationSeconds"] == 1
    assert peer.try_once() and store.lease["spec"]["leaseTransitions"] == 0   # a released Lease: no holder before


def test_leader_counts_an_unreachable_api_server_as_not_holding():
    elector = LeaderElector(Client(kopf.ConnectionInfo(server="http://127.0.0.1:1"), 1), "ns", "lease", "me")
    assert elector.try_once() is False


def test_the_operator_process_never_imports_the_kubernetes_client():
    """It is in the venv (the tests use it), so kopf would import it; the operator must not (issue 15)."""
    assert importlib.util.find_spec("kubernetes") is not None
    code = "import sys, tuneserve.main, tuneserve.controller.handlers; print(sorted(m for m in sys.modules if m.startswith('kubernetes')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'workers'}", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made as hack/localcluster.py does."""
    d = tmp_path_factory.mktemp("pki")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", *ext)
    return d


@pytest.fixture()
def tls_server(pki):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED   # as the API server does with a client CA: the certificate is the user
    srv = serve(ctx)
    yield srv
    srv.shutdown()
    srv.server_close()


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("inline", [False, True], ids=["files", "kubeconfig-data"])
def test_client_certificate_and_ca_from_files_or_kubeconfig_data(tls_server, pki, inline):
    if inline:
        info = kopf.ConnectionInfo(server=tls_server.url, ca_data=_b64(pki / "ca.crt"),
                                   certificate_data=_b64(pki / "client.crt"), private_key_data=_b64(pki / "client.key"))
    else:
        info = kopf.ConnectionInfo(server=tls_server.url, ca_path=str(pki / "ca.crt"),
                                   certificate_path=str(pki / "client.crt"), private_key_path=str(pki / "client.key"))
    api = KubeApi(Client(info, 1))
    for _ in range(3):
        api.apply(CM)
    assert [s.client_cn for s in tls_server.seen] == ["client"] * 3 and tls_server.seen[0].authorization is None
    assert len(tls_server.peers()) == 1


def test_a_server_the_ca_does_not_vouch_for_is_refused(tls_server, pki):
    info = kopf.ConnectionInfo(server=tls_server.url, certificate_path=str(pki / "client.crt"),
                               private_key_path=str(pki / "client.key"))   # the system CAs only
    with pytest.raises(ApiError) as err:
        Client(info, 1).request("GET", "/api")
    assert err.value.status == 0 and "CERTIFICATE_VERIFY_FAILED" in err.value.reason


def test_in_a_pod_the_api_server_is_the_one_of_the_service_environment(monkeypatch):
    """As client-go: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT (kopf's own default
    is the kubernetes.default.svc name, which needs cluster DNS)."""
    sa = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="sa-token", ca_path="/sa/ca.crt")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: sa)
    for host, server in (("10.96.0.1", "https://10.96.0.1:6443"), ("fd00::1", "https://[fd00::1]:6443")):
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
        info = connection_info()
        assert (info.server, info.token, info.ca_path) == (server, "sa-token", "/sa/ca.crt")


def test_outside_a_pod_the_kubeconfig_and_with_neither_a_login_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: None)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: None)
    with pytest.raises(kopf.LoginError):
        connection_info()


def test_a_rotated_service_account_token_is_used_within_a_minute(server, tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("tuneserve.controller.apiclient.time.monotonic", lambda: clock[0])
    token = tmp_path / "token"
    token.write_text("first\n")
    client = Client(kopf.ConnectionInfo(server=server.url, token="first"), 1, token_file=token)
    client.request("GET", "/api")
    token.write_text("second\n")   # the kubelet rotated it
    client.request("GET", "/api")
    clock[0] += 61
    client.request("GET", "/api")
    assert [s.authorization for s in server.seen] == ["Bearer first", "Bearer first", "Bearer second"]
