#!/usr/bin/env bash
# Installs the Debian packages the real node of the local cluster needs (hack/realnode.py):
# containerd + runc + CNI plugins to run pods, umoci/skopeo/debootstrap/busybox-static to build
# images without a registry, iptables/conntrack for kube-proxy, wget for in-pod checks.
# Idempotent: does nothing (and needs no network) when every package is already installed.
set -euo pipefail
pkgs=(containerd runc containernetworking-plugins umoci skopeo debootstrap iptables conntrack
      busybox-static wget)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "host packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing host packages (${missing[*]}); run this script as root" >&2
  exit 1
fi
echo "installing host packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${pkgs[@]}"
