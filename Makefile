# xiaolm: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
LLAMA_CPP_STAMP := $(VENV)/.installed-llama-cpp

.PHONY: demo test test-fast test-gguf bench bench-full lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/xiaolm demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# llama.cpp itself loads our GGUF files (same token ids, same greedy tokens). Not in `make test`: installing
# llama-cpp-python builds llama.cpp from source, ~15 min on 2 cores, more than the whole suite's budget.
$(LLAMA_CPP_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev,serve,llama-cpp]"
	touch $(LLAMA_CPP_STAMP)

test-gguf: $(LLAMA_CPP_STAMP)
	$(BIN)/python -m pytest -m llama_cpp tests/test_gguf_llama_cpp.py

# What the benchmarks import beyond the project (the `bench` extra), reinstalled only when pyproject.toml changes.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev,serve,bench]"
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
