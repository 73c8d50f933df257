# lmforge: `make pipeline` (install + full pipeline on the default data) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export PATH := $(BIN):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK ?= true
export DO_NOT_TRACK ?= 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export GIT_PYTHON_REFRESH ?= quiet

.PHONY: install pipeline repro promote test test-fast serve ui check check-lock deps constraints clean-outputs

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/python -m pip install -q -e '.[dev]' -c constraints.txt
	touch $@

install: $(STAMP)  ## create .venv and install the pinned stack

pipeline: install  ## run the whole Prefect flow: every stage through DVC, then promotion
	$(BIN)/lmforge pipeline

repro: install  ## the same stages with DVC alone (then `lmforge promote`); params.yaml is checked whole first
	$(BIN)/lmforge check
	$(BIN)/dvc repro

promote: install
	$(BIN)/lmforge promote

test: install  ## the whole test suite, integration included
	$(BIN)/python -m pytest

test-fast: install  ## unit, data and model tests only
	$(BIN)/python -m pytest -m "not integration"

serve: install  ## BentoML service for @champion on http://127.0.0.1:3000
	$(BIN)/lmforge serve

ui: install  ## MLflow UI on the embedded store, http://127.0.0.1:5000
	$(BIN)/lmforge ui

check: install  ## validate all of params.yaml; dvc.yaml deps and params against the code
	$(BIN)/lmforge check

check-lock: install  ## seconds, no training: name every code/params dependency whose hash in dvc.lock is stale
	$(BIN)/lmforge check-lock

deps: install  ## regenerate dvc.yaml's code deps and params from the stages' imports
	$(BIN)/lmforge deps --write

constraints: install  ## re-pin constraints.txt from the current .venv
	{ head -2 constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
