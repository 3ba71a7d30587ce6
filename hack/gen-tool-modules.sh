#!/usr/bin/env bash
# Regenerates hack/tools/*/go.mod and go.sum from hack/versions.env.
# Run it after changing a version, then commit the result; builds never rewrite these files.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

gen() {  # dir module-path go-version requires...
  local dir=$here/tools/$1; shift
  mkdir -p "$dir"; rm -f "$dir/go.mod" "$dir/go.sum"
  (cd "$dir" && go mod init "tuneserve.invalid/tools/$(basename "$dir")" >/dev/null 2>&1 && go mod edit -go="$1")
}

# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl: k8s.io/kubernetes requires its
# staging modules at v0.0.0 and replaces them with ./staging paths, which a dependency's replaces
# cannot do for us; replace each with its published v0.Y.Z tag instead.
gen kubernetes 1.25.0
kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
staging_tag=v0.${K8S_VERSION#v1.}
(cd "$here/tools/kubernetes"
 for m in $(sed -n 's|^\s*\(k8s.io/[^ ]*\) => ./staging/src/.*|\1|p' "$kmod"); do
   go mod edit -replace "$m=$m@$staging_tag"
 done
 go mod edit -godebug default=go1.25
 go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
   "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
   "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" \
   "k8s.io/kubernetes/cmd/kubelet@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-proxy@$K8S_VERSION")

gen etcd 1.25.0
(cd "$here/tools/etcd" && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION")

gen kwok 1.26.0
(cd "$here/tools/kwok" && go get -tool "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")

gen kuberay 1.24.0
(cd "$here/tools/kuberay" && go get -tool "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION")

gen helm 1.26.0
(cd "$here/tools/helm" && go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
# MinIO publishes no semver tags; MINIO_VERSION is the pseudo-version of a release commit.
gen minio 1.24.0
(cd "$here/tools/minio" && go get -tool "github.com/minio/minio@$MINIO_VERSION")
# CoreDNS: cluster DNS of the real node (hack/realnode.py).
gen coredns 1.26.0
(cd "$here/tools/coredns" && go get -tool "github.com/coredns/coredns@$COREDNS_VERSION")
echo "regenerated hack/tools/*/go.mod"
