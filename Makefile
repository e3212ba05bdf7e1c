# The one front door: make run | test | lint | generate | check-generated | bench | clean
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051

.PHONY: run test lint format generate check-generated unit integration e2e fault bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@scripts/run-local.sh $(LISTEN)

generate: $(STAMP)
	$(BIN)/python scripts/generate.py
	$(BIN)/buf format -w

check-generated: $(STAMP)
	$(BIN)/python scripts/generate.py --check

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --exit-code -d
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/buf format -w

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

fault: $(STAMP)
	$(BIN)/pytest -m fault

e2e: $(STAMP)
	$(BIN)/pytest tests/e2e

test: $(STAMP) check-generated lint
	$(BIN)/pytest

# BENCH_ARGS="--agents 2000" make bench; PULSE_DATABASE_URL selects the PostgreSQL server.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pulse .pulse-test .pytest_cache .mypy_cache .ruff_cache
