# bundlerec: `make demo` and `make test` are all a fresh machine needs (both run `make setup` first).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
TORCH_FIND_LINKS ?= /opt/wheels
UV := $(VENV)/bin/uv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RAY_ADDRESS_HTTP := http://127.0.0.1:8265
DEMO_CONFIG ?= jobs/configs/demo.yaml

.PHONY: setup demo services stop test test-fast lock clean

setup: $(VENV)/.installed

# uv + lock file + bytecode (Ray workers import ~2x faster with .pyc); torch is the pinned CPU wheel.
$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q uv==0.13.9
	$(UV) pip install --python $(VENV)/bin/python --find-links $(TORCH_FIND_LINKS) --compile-bytecode -r requirements.lock
	$(UV) pip install --python $(VENV)/bin/python --no-deps --compile-bytecode -e .
	@touch $@

lock:
	$(UV) pip compile pyproject.toml --extra dev --find-links $(TORCH_FIND_LINKS) --python-version 3.11 \
	  -c .ci/pins.txt -o requirements.lock

services: setup
	cluster/local.sh start

demo: services
	@start=$$(date +%s); \
	ray job submit --address $(RAY_ADDRESS_HTTP) --runtime-env jobs/runtime_env.yaml -- \
	  python -m jobs.pipeline --config $(DEMO_CONFIG) output_root=$(CURDIR) && \
	echo "demo wall time: $$(( $$(date +%s) - start ))s (job submit to finish)"; \
	echo; echo "summary:   runs/demo/summary.json"; \
	echo "MLflow UI: http://127.0.0.1:5000   Ray dashboard: $(RAY_ADDRESS_HTTP)   (stop with: make stop)"

stop:
	cluster/local.sh stop

test: setup
	timeout 5400 $(VENV)/bin/python -m pytest -x -q tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not integration" tests

clean: stop
	rm -rf runs .cluster
