"""Every control-plane version is pinned once, in hack/versions.env, and the Go modules agree."""
from pathlib import Path
import re

REPO = Path(__file__).resolve().parents[2]
MODULES = {
    "K8S_VERSION": ("kubernetes", "k8s.io/kubernetes"),
    "ETCD_VERSION": ("etcd", "go.etcd.io/etcd/server/v3"),
    "KWOK_VERSION": ("kwok", "sigs.k8s.io/kwok"),
    "KUBERAY_VERSION": ("kuberay", "github.com/ray-project/kuberay/ray-operator"),
    "HELM_VERSION": ("helm", "helm.sh/helm/v3"),
    "MINIO_VERSION": ("minio", "github.com/minio/minio"),
    "COREDNS_VERSION": ("coredns", "github.com/coredns/coredns"),
}


def pinned() -> dict:
    text = (REPO / "hack" / "versions.env").read_text()
    return dict(l.split("=", 1) for l in text.splitlines() if l and not l.startswith("#"))


def test_each_tool_module_requires_the_pinned_version():
    versions = pinned()
    for key, (tool, module) in MODULES.items():
        gomod = (REPO / "hack" / "tools" / tool / "go.mod").read_text()
        found = re.search(rf"^\s*{re.escape(module)} (v\S+)", gomod, re.M)
        assert found, f"{module} missing from hack/tools/{tool}/go.mod"
        assert found.group(1) == versions[key], f"{tool}: go.mod has {found.group(1)}, versions.env {versions[key]}"
        assert (REPO / "hack" / "tools" / tool / "go.sum").stat().st_size > 0


def test_kubernetes_staging_modules_are_replaced_with_the_matching_tag():
    versions = pinned()
    staging = "v0." + versions["K8S_VERSION"].removeprefix("v1.")
    gomod = (REPO / "hack" / "tools" / "kubernetes" / "go.mod").read_text()
    replaces = re.findall(r"^replace (k8s\.io/\S+) => \S+ (v\S+)", gomod, re.M)
    assert len(replaces) >= 31
    assert {v for _, v in replaces} == {staging}
