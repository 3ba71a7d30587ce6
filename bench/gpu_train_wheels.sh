#!/usr/bin/env bash
# Wheels that make bench/train_throughput.py's peers and its worker imports run on the GPU machine
# (no network there; its image has torch 2.11 cu130, triton 3.6, transformers 5.17, peft):
# pydantic (the worker's contract), liger-kernel, bitsandbytes (its cuda13 libraries only, to fit
# one 64 MiB transfer), unsloth with the requirements the image lacks (not xformers: optional at
# run time; not diffusers: not imported). Used for bench/results/train_issue16_h200_run*.txt.
#   bash bench/gpu_train_wheels.sh [.whl-gpu]     # then carry that folder and, on the machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-gpu/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
dest=${1:-.whl-gpu}
mkdir -p "$dest"
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  plat+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$dest" \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 liger-kernel==0.8.5 \
  bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 tyro==1.0.17 \
  cut_cross_entropy==25.1.1 hf_transfer==0.1.9 certifi==2026.10.19.post1 msgspec==0.22.0 json5==0.17.3 \
  nest-asyncio==1.6.0 structlog==26.1.0 dill==0.4.1 docstring_parser==0.18.0 multiprocess==0.70.19 \
  typeguard==4.6.1 fsspec==2026.2.0 importlib_metadata==8.7.0 torchao==0.17.0
python3 - "$dest" <<'PY'
"""Drop bitsandbytes' CUDA 11/12 libraries (the image is CUDA 13) and their RECORD lines."""
import glob, os, re, sys, zipfile
src = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl"))[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_cuda1(1|2)\d+\.so")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
    for item in zi.infolist():
        if drop.fullmatch(item.filename):
            continue
        data = zi.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = [ln for ln in data.decode().splitlines() if not drop.match(ln.split(",")[0])]
            data = ("\n".join(lines) + "\n").encode()
        zo.writestr(item, data)
os.replace(tmp, src)
PY
du -sh "$dest"
