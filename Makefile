# The two commands a user needs: `make repro` (whole pipeline on the embedded default) and
# `make test`. Both create the virtual environment at .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# Tool state stays inside ignored folders of the repo; nothing is fetched at run time.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_LOGGING_LEVEL ?= INFO
export HF_HOME := $(CURDIR)/.hf
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc-site
export MPLCONFIGDIR := $(CURDIR)/.mplconfig
export TOKENIZERS_PARALLELISM := false
export PYTHONPATH := $(CURDIR)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test repro bench clean-venv demo-model demo-data

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/eval.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints.txt -r requirements/base.txt
	$(PIP) install -q --no-deps -c requirements/constraints.txt -r requirements/eval.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

repro: setup
	$(VENV)/bin/dvc repro

clean-venv:
	rm -rf $(VENV)

# Embedded default model (one-time build, ~1 h on 2 CPU cores): rendered visual-QA splits, then a
# tiny Qwen2-VL trained on them, written to data/demo/model/ (committed). See docs/demo.md.
demo-data: setup
	$(PY) -m stages.demo_data

demo-model: demo-data
	$(PY) -m stages.demo_model

# Solver benchmark against llm-compressor's GPTQ (reference). Separate environment .venv-bench:
# llm-compressor pins transformers<=5.17, the project uses 5.23. Pass flags with
# BENCH_ARGS, e.g. `make bench-solver BENCH_ARGS=--quick`. Writes reports/bench/solver.json.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

.PHONY: bench-solver

$(BENCH_STAMP): pyproject.toml requirements/bench.txt requirements/constraints.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -c requirements/constraints.txt -r requirements/bench.txt
	$(BENCH_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(BENCH_STAMP)

bench-solver: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/solver.py $(BENCH_ARGS)
