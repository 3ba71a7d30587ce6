"""The real node beside the kwok fleet (hack/realnode.py): real containers, logs, cluster DNS,
ClusterIP Services from pods and from the host, the in-cluster API with a ServiceAccount token,
and Ray-dashboard traffic that the stand-in forwards to a head that really runs.

That teardown leaves nothing on the machine is checked by the session `cluster` fixture
(tests/conftest.py) after the session cluster stops: only one real node can exist per machine.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from kube import wait_for
from oci import build_image, busybox_rootfs

POOL = "real-cpu"
IMAGE = "tuneserve.local/busybox:test"
TOLERATION = {"key": "tuneserve.dev/real-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def busybox(cluster, tmp_path_factory) -> str:
    """A tiny image (Debian's busybox-static) built here and imported into the real node."""
    assert cluster.real_node is not None, "the session cluster must start the real node (fleet pool real-cpu)"
    tmp = tmp_path_factory.mktemp("busybox")
    rootfs = busybox_rootfs(tmp / "rootfs")
    for lib in ("lib", "lib64"):   # so the host's /usr (mounted by some tests) works inside
        (rootfs / lib).symlink_to(f"usr/{lib}")
    tar = build_image(rootfs, IMAGE, tmp / "busybox.tar", {"entrypoint": [], "cmd": ["sh"]})
    cluster.import_image(tar)
    return IMAGE


def real_pod(name: str, script: str, labels: dict | None = None, **spec) -> dict:
    """A pod pinned to the real node, running ``script`` in busybox sh."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"nodeSelector": {"tuneserve.dev/pool": POOL}, "tolerations": [TOLERATION],
                     "restartPolicy": "Never", "terminationGracePeriodSeconds": 1, **spec,
                     "containers": [{"name": "main", "image": IMAGE, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", script]}]}}


def http_server(name: str, port: int, body: str, path: str = "/index.html") -> tuple[dict, dict]:
    """A busybox httpd pod serving ``body`` at ``path``, and a Service for it on ``port``."""
    script = f"mkdir -p /www$(dirname {path}) && echo '{body}' > /www{path} && exec httpd -f -p {port} -h /www"
    pod = real_pod(name, script, labels={"app": name})
    pod["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": port}]}}
    return pod, svc


def wait_phase(kube, namespace: str, name: str, phases: set[str], timeout: float = 90) -> dict:
    def done():
        pod = kube.get("v1", "Pod", name, namespace)
        return pod if pod and pod["status"].get("phase") in phases else None
    return wait_for(done, timeout, f"pod {namespace}/{name} in {phases}")


def wait_ready_endpoints(kube, namespace: str, name: str) -> None:
    def ready():
        slices = kube.list("discovery.k8s.io/v1", "EndpointSlice", namespace,
                           label_selector=f"kubernetes.io/service-name={name}")
        return any((e.get("conditions") or {}).get("ready") for s in slices for e in s.get("endpoints") or [])
    wait_for(ready, 90, f"a ready endpoint of service {namespace}/{name}")


def fetch(opener, url: str):
    """The body, or None while the Service is not reachable yet (kube-proxy syncs its rules)."""
    try:
        return opener.open(url, timeout=10).read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 502:
            return None
        raise


def fetch_or_none(url: str):
    """The body, or None while nothing routes to the address yet."""
    try:
        return fetch(NO_PROXY, url)
    except (urllib.error.URLError, OSError):
        return None


def logs(cluster, namespace: str, name: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, name).stdout


def test_real_node_is_ready_with_its_pool_label_and_taint(kube, cluster):
    node = kube.get("v1", "Node", cluster.real_node.node_name)
    assert node["metadata"]["labels"]["tuneserve.dev/pool"] == POOL
    assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})
    assert {"key": TOLERATION["key"], "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == cluster.real_node.bridge_ip


def test_pod_runs_on_the_real_node_and_its_logs_are_served(kube, cluster, namespace, busybox):
    kube.apply(real_pod("hello", "echo hello from $(hostname); cat /proc/1/cgroup | head -1"), namespace)
    pod = wait_phase(kube, namespace, "hello", {"Succeeded", "Failed"})
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["spec"]["nodeName"] == cluster.real_node.node_name
    assert "hello from hello" in logs(cluster, namespace, "hello")


def test_services_resolve_and_answer_from_pods_and_the_host(kube, cluster, namespace, busybox):
    pod, svc = http_server("web", 8080, "served-by-web")
    kube.apply([pod, svc], namespace)
    wait_ready_endpoints(kube, namespace, "web")
    cluster_ip = kube.get("v1", "Service", "web", namespace)["spec"]["clusterIP"]
    # Ready endpoints come before kube-proxy's rules for them: wait until the ClusterIP answers the
    # host (the same sync programs the pods' path), else the client can meet "No route to host".
    body = wait_for(lambda: fetch_or_none(f"http://{cluster_ip}:8080/index.html"), 60,
                    f"kube-proxy to route {cluster_ip}")
    assert "served-by-web" in body                 # host -> bridge -> ClusterIP
    # Debian's busybox-static wget segfaults (even on the host), so HTTP goes through nc, to the
    # ClusterIP from the Service environment variable; nslookup checks DNS.
    script = (f"nslookup web.{namespace}.svc.cluster.local; "
              "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 $WEB_SERVICE_HOST 8080; "
              "nslookup example.com && echo OUTSIDE-RESOLVED || echo outside-not-resolved")
    kube.apply(real_pod("client", script), namespace)
    wait_phase(kube, namespace, "client", {"Succeeded", "Failed"})
    out = logs(cluster, namespace, "client")
    assert cluster_ip in out, out                  # DNS: the Service name resolved to its ClusterIP
    assert "served-by-web" in out, out             # pod -> ClusterIP (kube-proxy) -> pod
    assert "outside-not-resolved" in out, out      # no upstream: nothing leaves the machine


def test_pod_calls_the_apiserver_with_its_serviceaccount_token(kube, cluster, namespace, busybox):
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"},
                "data": {"word": "in-cluster-ok"}}, namespace)
    kube.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-cm"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "read-cm"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
         "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}]}], namespace)
    # The host's Python (its /usr mounted read-only: same glibc) talks to the API the way
    # in-cluster clients do: KUBERNETES_SERVICE_HOST:PORT, the token, and the CA it verifies with.
    # (busybox's wget segfaults and its ssl_client cannot handshake with the apiserver.)
    script = ("exec /usr/bin/python3 -c '"
              "import os, ssl, urllib.request as u; sa=\"/var/run/secrets/kubernetes.io/serviceaccount/\"; "
              "ns=open(sa+\"namespace\").read(); tok=open(sa+\"token\").read(); "
              "url=\"https://%s:%s/api/v1/namespaces/%s/configmaps/probe\" % (os.environ[\"KUBERNETES_SERVICE_HOST\"], "
              "os.environ[\"KUBERNETES_SERVICE_PORT\"], ns); "
              "req=u.Request(url, headers={\"Authorization\": \"Bearer \" + tok}); "
              "ctx=ssl.create_default_context(cafile=sa+\"ca.crt\"); "
              "print(u.urlopen(req, context=ctx, timeout=10).read().decode()); "
              "print(\"host=\" + os.environ[\"KUBERNETES_SERVICE_HOST\"])'")
    pod = real_pod("api", script, volumes=[{"name": "usr", "hostPath": {"path": "/usr", "type": "Directory"}}])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "usr", "mountPath": "/usr", "readOnly": True}]
    kube.apply(pod, namespace)
    pod = wait_phase(kube, namespace, "api", {"Succeeded", "Failed"})
    out = logs(cluster, namespace, "api")
    assert pod["status"]["phase"] == "Succeeded", out
    assert "host=10.96.0.1" in out
    body = next((line for line in out.splitlines() if line.startswith("{")), None)
    assert body, out
    assert json.loads(body)["data"]["word"] == "in-cluster-ok", out


def test_dashboard_stand_in_forwards_to_a_head_that_really_runs(kube, cluster, namespace, busybox):
    """KubeRay reaches heads through the stand-in (HTTP_PROXY): a Service whose pods are on the
    real node gets the real answer, not the stand-in's."""
    pod, svc = http_server("real-head-svc", 8265, '{"ray_version": "from-the-real-head"}', "/api/version")
    kube.apply([pod, svc], namespace)
    wait_ready_endpoints(kube, namespace, "real-head-svc")
    proxy = urllib.request.build_opener(urllib.request.ProxyHandler({"http": cluster.dashboard_url}))
    url = f"http://real-head-svc.{namespace}.svc.cluster.local:8265/api/version"
    body = wait_for(lambda: fetch(proxy, url), 30, "the forwarded answer (kube-proxy syncs the Service)")
    assert json.loads(body)["ray_version"] == "from-the-real-head"
    missing = f"http://real-head-svc.{namespace}.svc.cluster.local:8265/nope"
    with pytest.raises(urllib.error.HTTPError) as err:
        proxy.open(missing, timeout=10)
    assert err.value.code == 404 and "stand-in" not in err.value.read().decode()


def test_stand_in_still_answers_for_simulated_heads(cluster):
    proxy = urllib.request.build_opener(urllib.request.ProxyHandler({"http": cluster.dashboard_url}))
    body = json.loads(proxy.open("http://sim-head-svc.default.svc.cluster.local:8265/api/version", timeout=10).read())
    assert body["ray_commit"] == "stand-in"
