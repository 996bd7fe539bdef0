# bundlerec: `make demo` and `make test` are all a fresh machine needs (both run `make setup` first).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
# torch is pinned to the CPU build (2.13.0+cpu). It comes from a local wheel folder when one holds it
# (this project's CI image: /opt/wheels), else from PyTorch's CPU index (needs that host reachable).
TORCH_FIND_LINKS ?= /opt/wheels
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SOURCE := $(if $(wildcard $(TORCH_FIND_LINKS)/torch-*.whl),--find-links $(TORCH_FIND_LINKS),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
UV := $(VENV)/bin/uv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The environment defaults are bundlerec.runtime.ENV_DEFAULTS (tests/test_config.py checks they agree).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := token
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Ports of the local services (cluster/local.sh reads the same variables; it reuses services already up).
export DASHBOARD_PORT ?= 8265
export MLFLOW_PORT ?= 5000
RAY_ADDRESS_HTTP := http://127.0.0.1:$(DASHBOARD_PORT)
DEMO_CONFIG ?= jobs/configs/demo.yaml
DEMO_ROOT ?= $(CURDIR)
DEMO_ARGS ?=

.PHONY: setup system-packages demo services stop lint test test-fast test-unit test-integration test-e2e lock clean wheelhouse

setup: system-packages $(VENV)/.installed

# Debian's chromium and postgresql for the browser and backend tests: installed where this user may,
# otherwise one line says what to run (the tests that need them skip, and fail under CI=true).
system-packages:
	@cluster/system-packages.sh

# uv + lock file + bytecode (Ray workers import ~2x faster with .pyc); torch is the pinned CPU wheel.
$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q uv==0.13.9
	@echo "torch from: $(TORCH_SOURCE)"
	$(UV) pip install --python $(VENV)/bin/python $(TORCH_SOURCE) --compile-bytecode -r requirements.lock
	$(UV) pip install --python $(VENV)/bin/python --no-deps --compile-bytecode -e .
	@touch $@

lock:
	$(UV) pip compile pyproject.toml --extra dev $(TORCH_SOURCE) --python-version 3.11 \
	  -c .ci/pins.txt -o requirements.lock

services: setup
	cluster/local.sh start

# `bundlerec submit` = ray job submit with jobs/runtime_env.yaml and the outputs kept under DEMO_ROOT; it
# resubmits while a just-started (or loaded) head has no job agent yet ("No available agent to submit job").
demo: services
	@start=$$(date +%s); \
	bundlerec submit --address $(RAY_ADDRESS_HTTP) pipeline --config $(DEMO_CONFIG) output_root=$(DEMO_ROOT) $(DEMO_ARGS) \
	  || exit 1; \
	echo "demo wall time: $$(( $$(date +%s) - start ))s (job submit to finish)"; \
	echo; echo "summary:   $(DEMO_ROOT)/runs/<config name>/summary.json (report_url: the run's evaluation report in MLflow)"; \
	echo "explorer:  http://127.0.0.1:8000/  (bundle explorer page; API token in $(DEMO_ROOT)/runs/<config name>/api_token)"; \
	echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)   Ray dashboard: $(RAY_ADDRESS_HTTP) (token: ray get-auth-token)   (stop with: make stop)"

stop:
	cluster/local.sh stop

lint: setup
	$(VENV)/bin/ruff check bundlerec jobs serve tests

# Two pytest processes side by side, each with its own Ray cluster when it needs one (tests/conftest.py
# marks the tests): the job API, Serve and pipeline tests (`ray and not training`, the job-submitting
# ones first), and the tests without Ray followed by the Train and Tune tests (`not ray or training`),
# whose cluster starts once the job submissions are done; its output follows.
test: setup lint
	@mkdir -p runs/test-artifacts; \
	export BUNDLEREC_TEST_JOBS_DONE=$$(mktemp -u /tmp/bundlerec-jobs-done-XXXXXX); \
	BUNDLEREC_TEST_STREAM=b timeout 5400 $(VENV)/bin/python -m pytest -x -q --durations=15 -m "not ray or training" \
	  -p no:cacheprovider --basetemp=$$(mktemp -d /tmp/bundlerec-tests-b-XXXXXX) tests \
	  > runs/test-artifacts/pytest-b.log 2>&1 & other=$$!; \
	BUNDLEREC_TEST_STREAM=a timeout 5400 $(VENV)/bin/python -m pytest -x -q --durations=20 -m "ray and not training" tests; \
	a_rc=$$?; wait $$other; b_rc=$$?; \
	echo "---- beside it: pytest -m 'not ray or training' (exit $$b_rc)"; \
	cat runs/test-artifacts/pytest-b.log; rm -f "$$BUNDLEREC_TEST_JOBS_DONE"; \
	exit $$(( a_rc != 0 ? a_rc : b_rc ))

# The tiers: unit (no Ray, about a minute), integration (real services on 127.0.0.1), end to end.
test-fast test-unit: setup
	$(VENV)/bin/python -m pytest -q -m "not integration" tests

test-integration: setup
	timeout 5400 $(VENV)/bin/python -m pytest -x -q -m "integration and not e2e" tests

test-e2e: setup
	timeout 5400 $(VENV)/bin/python -m pytest -x -q -m e2e tests

clean: stop
	rm -rf runs .cluster

# The offline bundle (<= 64 MiB) for a GPU node without internet, and its installer + benchmark
# matrix: cluster/gpu-node/ (needs PyPI here; not part of `make test`).
WHEELHOUSE ?= .wheelhouse
wheelhouse: setup
	bash cluster/gpu-node/wheelhouse.sh $(WHEELHOUSE)
