#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go modules pinned in hack/tools/*/go.mod
# (versions from hack/versions.env) into a cache outside the repo, keyed by version.
# A component whose binaries are already cached is skipped, so a warm run takes seconds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
cache=${TUNESERVE_CACHE:-$HOME/.cache/tuneserve}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
mkdir -p "$cache/bin"

have() {  # dir bin...: true when every binary is present
  local d=$1; shift
  for b in "$@"; do [ -x "$d/$b" ] || return 1; done
}

timed() {  # name cmd...: runs cmd, prints its wall time
  local name=$1 t0=$SECONDS; shift
  echo "building $name ..."
  "$@"
  echo "built $name in $((SECONDS - t0))s"
}

moddir() {  # module@version -> its directory in the module cache (downloads when missing)
  go mod download -json "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])'
}

build_into() {  # out-dir tool-dir ldflags pkgs...
  local out=$1 tool=$2 ld=$3; shift 3
  local tmp="$out.partial"; rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$here/tools/$tool" && go build -trimpath -ldflags "-s -w $ld" -o "$tmp/" "$@")
  rm -rf "$out"; mv "$tmp" "$out"
}

# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl in one go build so shared
# packages compile once. Stamped so /version, kubectl and helm see the real release.
k8s_dir=$cache/bin/kubernetes-$K8S_VERSION
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ld=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ld="$ld -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
if ! have "$k8s_dir" kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  timed "kubernetes $K8S_VERSION" build_into "$k8s_dir" kubernetes "$ld" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
fi

etcd_dir=$cache/bin/etcd-$ETCD_VERSION
if ! have "$etcd_dir" etcd; then
  timed "etcd $ETCD_VERSION" build_into "$etcd_dir" etcd "" go.etcd.io/etcd/server/v3
  mv "$etcd_dir/server" "$etcd_dir/etcd"   # the main package is the module root, named "server"
fi

# kwok, plus the Stage YAMLs shipped in its module (v0.8 has no built-in stages).
kwok_dir=$cache/bin/kwok-$KWOK_VERSION
if ! have "$kwok_dir" kwok || [ ! -d "$kwok_dir/stages" ]; then
  timed "kwok $KWOK_VERSION" build_into "$kwok_dir" kwok \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" sigs.k8s.io/kwok/cmd/kwok
  src=$(cd "$here/tools/kwok" && moddir "sigs.k8s.io/kwok@$KWOK_VERSION")
  mkdir -p "$kwok_dir/stages"
  cp -r "$src/kustomize/stage/." "$kwok_dir/stages/"; chmod -R u+w "$kwok_dir/stages"
fi

# The KubeRay operator and its CRDs, taken from the same module so they always match.
ray_dir=$cache/bin/kuberay-$KUBERAY_VERSION
if ! have "$ray_dir" ray-operator || [ ! -d "$ray_dir/crds" ]; then
  timed "kuberay $KUBERAY_VERSION" build_into "$ray_dir" kuberay "" \
    github.com/ray-project/kuberay/ray-operator
  src=$(cd "$here/tools/kuberay" && moddir "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION")
  mkdir -p "$ray_dir/crds"
  cp "$src"/config/crd/bases/ray.io_*.yaml "$ray_dir/crds/"; chmod -R u+w "$ray_dir/crds"
fi

helm_dir=$cache/bin/helm-$HELM_VERSION
if ! have "$helm_dir" helm; then
  timed "helm $HELM_VERSION" build_into "$helm_dir" helm \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm
fi

# MinIO: the S3-compatible server the worker tests keep datasets, checkpoints and adapters in.
minio_dir=$cache/bin/minio-$MINIO_VERSION
if ! have "$minio_dir" minio; then
  timed "minio $MINIO_VERSION" build_into "$minio_dir" minio "" github.com/minio/minio
fi

# The real node beside the kwok fleet (hack/realnode.py): kubelet and kube-proxy from the same
# k8s.io/kubernetes module and stamps, in their own directory so a cached control plane is reused;
# the pause binary (containerd's sandbox image) compiled from that module's build/pause/linux/pause.c.
node_dir=$cache/bin/kubernetes-node-$K8S_VERSION
if ! have "$node_dir" kubelet kube-proxy pause; then
  timed "kubelet, kube-proxy $K8S_VERSION" build_into "$node_dir" kubernetes "$ld" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
  src=$(cd "$here/tools/kubernetes" && moddir "k8s.io/kubernetes@$K8S_VERSION")
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION" -o "$node_dir/pause.partial" \
    "$src/build/pause/linux/pause.c"
  mv "$node_dir/pause.partial" "$node_dir/pause"
fi

# CoreDNS: cluster DNS for the real node's pods (its default plugin set includes kubernetes).
coredns_dir=$cache/bin/coredns-$COREDNS_VERSION
if ! have "$coredns_dir" coredns; then
  timed "coredns $COREDNS_VERSION" build_into "$coredns_dir" coredns \
    "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" github.com/coredns/coredns
fi

# One stable directory of links, so callers need not know versions.
mkdir -p "$cache/current"
for f in "$k8s_dir"/* "$etcd_dir/etcd" "$kwok_dir/kwok" "$ray_dir/ray-operator" "$helm_dir/helm" \
         "$minio_dir/minio" "$node_dir"/* "$coredns_dir/coredns"; do
  ln -sfn "$f" "$cache/current/$(basename "$f")"
done
ln -sfn "$kwok_dir/stages" "$cache/current/kwok-stages"
ln -sfn "$ray_dir/crds" "$cache/current/kuberay-crds"
echo "control-plane binaries ready in $cache/current"
