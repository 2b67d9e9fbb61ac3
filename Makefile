# xiaolm: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test test-fast bench bench-full lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,serve,eval]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/xiaolm demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# What the benchmarks import beyond the project (the `bench` extra), reinstalled only when pyproject.toml changes.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev,serve,eval,bench]"
	touch $(BENCH_STAMP)

# Every benchmark at its quick size (~15 min on 2 cores), one dated section of benchmarks/RESULTS.md.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks

# The sizes the README quotes: hours.
bench-full: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks --full

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs build src/*.egg-info
