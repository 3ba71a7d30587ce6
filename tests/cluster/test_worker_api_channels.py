"""The workers' own API channels against the real API server, with a narrowly scoped token:
the serve replicas read the desired adapters from their ConfigMap; the trainer patches progress."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.cluster


@pytest.fixture
def pod_identity(kube, namespace, cluster, tmp_path, monkeypatch):
    """A ServiceAccount allowed get/patch on one ConfigMap, and the files a pod would have."""
    kube.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "replica"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "one-configmap"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["ms-adapters"],
                    "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "replica"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "one-configmap"},
         "subjects": [{"kind": "ServiceAccount", "name": "replica", "namespace": namespace}]},
    ], namespace)
    token = cluster.kubectl("create", "token", "replica", "-n", namespace).stdout.strip()
    (tmp_path / "token").write_text(token)
    (tmp_path / "ca.crt").write_text((cluster.dir / "pki" / "ca.crt").read_text())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(cluster.ports["apiserver"]))
    return tmp_path


def test_replica_reads_the_desired_adapters_through_the_api_as_soon_as_they_change(kube, namespace, pod_identity):
    from tuneserve_workers.contract import ADAPTERS_KEY
    from tuneserve_workers.serve.adapters import AdapterReconciler
    from tuneserve_workers.serve.report import ConfigMapKeySource
    from tuneserve_workers.contract import ModelSource

    def desired(names):
        return json.dumps([{"name": n, "uri": f"/adapters/{n}"} for n in names])

    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ms-adapters"},
                "data": {ADAPTERS_KEY: desired(["a"])}}, namespace)
    source = ConfigMapKeySource(f"{namespace}/ms-adapters", ADAPTERS_KEY, sa_dir=str(pod_identity))
    rec = AdapterReconciler(loader=None, base=ModelSource(uri="/base"), max_rank=8, source=source)
    assert [a.name for a in rec.read_desired()] == ["a"]
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ms-adapters"},
                "data": {ADAPTERS_KEY: desired(["a", "b"])}}, namespace)
    assert [a.name for a in rec.read_desired()] == ["a", "b"], "no kubelet refresh delay"


def test_the_token_reaches_only_its_own_configmap(kube, namespace, pod_identity):
    from tuneserve_workers.serve.report import ConfigMapKeySource
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {"k": "v"}}, namespace)
    with pytest.raises(Exception) as err:
        ConfigMapKeySource(f"{namespace}/other", "k", sa_dir=str(pod_identity)).read()
    assert "403" in str(err.value)


def test_training_progress_sink_patches_the_configmap(kube, namespace, pod_identity):
    from tuneserve_workers.train.progress import ConfigMapSink
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ms-adapters"}}, namespace)
    ConfigMapSink(f"{namespace}/ms-adapters", sa_dir=str(pod_identity)).write('{"step": 7}')
    cm = kube.get("v1", "ConfigMap", "ms-adapters", namespace)
    assert json.loads(cm["data"]["progress.json"]) == {"step": 7}
