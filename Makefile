# recsys: the README's commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and the demo keep TensorFlow quiet and on Keras 2 (TFRS needs tf_keras).
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_USE_LEGACY_KERAS := 1
export GX_ANALYTICS_ENABLED := false

.DEFAULT_GOAL := help
.PHONY: help setup system-deps demo test test-unit test-integration lint bench clean-state airflow

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

setup: $(STAMP) ## Create or reuse .venv with the pinned stack (nothing else)

system-deps: ## Install the system packages tests use (Redis, PostgreSQL) where missing
	@bash scripts/system-deps.sh

demo: $(STAMP) ## Run the main job end to end on the embedded defaults
	$(BIN)/recsys demo

test: $(STAMP) system-deps ## Run all tests (unit, DAG, integration)
	$(BIN)/pytest -q

test-unit: $(STAMP) ## Fast pure tests only
	$(BIN)/pytest -q tests/unit

lint: $(STAMP) ## ruff, the architecture's layers (import-linter) and types (mypy on the kernel and serving)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(STAMP) ## Benchmarks (print tables; results go to BENCHMARKS.md)
	$(BIN)/python -m bench.generate
	$(BIN)/python -m bench.feature_lookup
	$(BIN)/python -m bench.serving

airflow: $(STAMP) ## Airflow with the project's DAGs: UI on localhost:8080 (AIRFLOW_PORT), Ctrl-C stops
	$(BIN)/python -m entrypoints.airflow_local --port $${AIRFLOW_PORT:-8080}

clean-state: ## Delete all runtime state (var/ or $$RECSYS_HOME)
	rm -rf "$${RECSYS_HOME:-var}"
