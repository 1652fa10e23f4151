# Kneo — the targets a newcomer can guess. Everything runs from a local virtualenv that `make` creates.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kneo-installed

.PHONY: install demo up test test-unit test-integration test-compat bench lint format clean

$(STAMP): pyproject.toml constraints.txt tests/clients/package-lock.json
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@# the TypeScript compiler for the Knap document's TypeScript client test (only where Node is installed)
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/clients --no-audit --no-fund --silent; fi
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install kneo with pinned dependencies

demo: $(STAMP)  ## start the embedded platform, run examples/research_agent.yaml, stream it live, stop
	$(BIN)/kneo demo

up: $(STAMP)  ## serve the whole platform on 127.0.0.1:8000 until Ctrl-C (data under .kneo/)
	$(BIN)/kneo service serve

test: $(STAMP)  ## the whole test suite (unit, integration, e2e) on servers the fixtures start
	$(BIN)/python -m pytest

test-compat: $(STAMP)  ## integration + e2e against this machine's PostgreSQL 15 and NATS 2.9
	KNEO_TEST_NATS_URL=$${KNEO_TEST_NATS_URL:-nats://127.0.0.1:4222} \
	KNEO_TEST_DATABASE_URL=$${KNEO_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/kneo_ci} \
	$(BIN)/python -m pytest tests/integration tests/e2e

bench: $(STAMP)  ## benchmarks (writes JSON to bench/results/)
	$(BIN)/python -m tests.bench.bench_runs
	$(BIN)/python -m tests.bench.bench_runs --workflow fanout8 --runs 400 --sequential 100 --sse 50
	$(BIN)/python -m tests.bench.bench_jobs

lint: $(STAMP)  ## ruff + mypy --strict on libs/kneo_events
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove the virtualenv and local data (.kneo/)
	rm -rf $(VENV) .kneo
