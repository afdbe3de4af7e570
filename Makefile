# The two commands: `make run` and `make test`. Each installs what it needs on a fresh Debian
# machine that has Python 3.11, and skips what is already there.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT    := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: run test install models setup test-tools bench-tools bench lint clean help
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

SSLYZE := tests/tls/.venv/bin/sslyze

test-tools: $(OIDC) $(SSLYZE)  ## what the suite drives: curl, redis-server, iproute2, Node and oidc-provider, sslyze
	@command -v curl >/dev/null || { $(APT) update -qq && $(APT) install -y -qq curl; }
	@command -v redis-server >/dev/null || { $(APT) update -qq && $(APT) install -y -qq redis-server; }
	@command -v ip >/dev/null || { $(APT) update -qq && $(APT) install -y -qq iproute2; }  # the namespace network

$(OIDC): tests/oidc/package-lock.json
	@command -v npm >/dev/null || { $(APT) update -qq && $(APT) install -y -qq nodejs npm; }
	cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# sslyze pins a cryptography older than the gateway's: it gets an environment of its own.
$(SSLYZE): tests/tls/sslyze.lock
	python3 -m venv tests/tls/.venv
	tests/tls/.venv/bin/python -m pip install -q --require-hashes -r tests/tls/sslyze.lock
	@touch $@

bench-tools:  ## the load generator and compiler the benchmark needs (wrk, cc)
	@command -v wrk >/dev/null && command -v cc >/dev/null || { $(APT) update -qq && $(APT) install -y -qq wrk gcc libc6-dev; }

test: models test-tools  ## run the whole suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: models bench-tools  ## benchmark the gateway path against in-process ONNX Runtime
	$(BIN)/python bench/bench_gateway.py $(BENCH_ARGS)

lint: $(STAMP)  ## ruff, and mypy --strict on the package (the suite runs both too)
	$(BIN)/ruff check gateway gateway_client tests bench models && $(BIN)/mypy

clean:  ## remove the virtual environment and generated files (keeps certs and config)
	rm -rf $(VENV) .pytest_cache models/*/*/model.onnx models/*/*/manifest.json
