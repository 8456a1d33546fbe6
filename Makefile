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

.PHONY: setup test repro bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints.txt -r requirements/base.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

repro: setup
	$(VENV)/bin/dvc repro

clean-venv:
	rm -rf $(VENV)
