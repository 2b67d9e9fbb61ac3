# xiaolm: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
BENCH_STAMP := $(VENV)/.installed-bench
LLAMA_CPP_STAMP := $(VENV)/.installed-llama-cpp
# The web page tests drive Debian's Chromium (tests/browser.py); a CJK font makes their screenshots legible.
CHROMIUM ?= $(or $(XIAOLM_CHROMIUM),/usr/bin/chromium)
CHROMIUM_PACKAGES := chromium fonts-wqy-microhei

.PHONY: demo demo-full test test-fast test-gguf bench bench-full lint venv clean chromium

# The demo needs the package and its server; the tests add the dev tools (pytest, ruff, ray, trl, ...).
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[serve,eval]"
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,serve,eval]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/xiaolm demo --out runs/demo

# The demo, then PPO on its numeral and arithmetic prompts, rewarded by the exact answer and the demo's reward
# model, with the KL guard (configs/ppo.yaml). Not in the default demo: it adds minutes on 2 cores.
demo-full: demo
	$(BIN)/xiaolm ppo --config configs/ppo.yaml init_from=runs/demo/dpo out=runs/demo/ppo \
		data.path=runs/demo/corpus/rl_prompts.jsonl rl.reward_model=runs/demo/reward --resume

# Installed once, as root where apt-get exists (about a minute, ~150 MB); elsewhere a message, and the page tests
# fail saying the same.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's $(CHROMIUM_PACKAGES) for the web page tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CHROMIUM_PACKAGES) \
		|| echo "make: installing $(CHROMIUM_PACKAGES) failed: tests/test_web_page.py will fail" >&2; \
	else \
		echo "make: no $(CHROMIUM): tests/test_web_page.py will fail; install it with" \
			"'sudo apt-get install $(CHROMIUM_PACKAGES)' (Debian, Ubuntu) or set XIAOLM_CHROMIUM" >&2; \
	fi

chromium: $(CHROMIUM)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest

test-fast: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -m "not slow"

# llama.cpp itself loads our GGUF files (same token ids, same greedy tokens). Not in `make test`: installing
# llama-cpp-python builds llama.cpp from source, ~15 min on 2 cores, more than the whole suite's budget.
$(LLAMA_CPP_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev,serve,eval,llama-cpp]"
	touch $(LLAMA_CPP_STAMP)

test-gguf: $(LLAMA_CPP_STAMP)
	$(BIN)/python -m pytest -m llama_cpp tests/test_gguf_llama_cpp.py

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
