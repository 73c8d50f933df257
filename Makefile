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

.PHONY: help install lint pipeline repro curve promote retrain schedule deploy test test-fast serve serve-grpc bento grpc-stubs ui check check-lock deps constraints postgres stack-up stack-down prefect-ui

.DEFAULT_GOAL := help

help:  ## this list: every target with what it does (`make` with no target prints it)
	@echo "lmforge: make pipeline (install + the whole pipeline on the embedded data), make test; every target:"
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-zA-Z_-]+:[^=]*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Where pip and uv find torch's CPU wheel (torch==2.13.0+cpu, hashed in constraints.txt). PyPI has only the CUDA
# build, which pulls GBs of nvidia-* wheels; elsewhere: TORCH_WHEELS=https://download.pytorch.org/whl/cpu/torch/
TORCH_WHEELS ?= /opt/wheels

# Hash-checking mode: constraints.txt pins every distribution with its hashes (all extras: the tests cover the
# team stack and the stubs), pip refuses anything else; then the project itself, editable, with nothing more.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes --find-links $(TORCH_WHEELS) -r constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

install: $(STAMP)  ## create .venv and install constraints.txt (hashed, every extra), then the project (editable, --no-deps)

pipeline: install  ## run the whole Prefect flow: every stage through DVC, then promotion
	$(BIN)/lmforge pipeline

repro: install  ## the same stages with DVC alone (then `lmforge promote`); params.yaml is checked whole first
	$(BIN)/lmforge check
	$(BIN)/dvc repro

curve: install  ## the learning curve, outside the pipeline (curve/dvc.yaml): where pretraining pays, 8/32/128/all labels per class; after make pipeline
	$(BIN)/lmforge check
	$(BIN)/dvc repro curve/dvc.yaml

promote: install  ## gates + registry after a `dvc repro`: register @candidate, move @champion if every gate passes
	$(BIN)/lmforge promote

retrain: install  ## retrain now unless data, code and params equal @champion's lineage (then it skips in seconds)
	$(BIN)/lmforge retrain

schedule: install  ## serve the weekly retrain schedule (prefect.yaml) on this machine until Ctrl-C; starts a local Prefect server
	$(BIN)/lmforge schedule

deploy: install  ## on the Prefect server in PREFECT_API_URL: create the cpu/gpu work pools and the deployments of prefect.yaml
	$(BIN)/lmforge deploy

lint: install  ## ruff check (pyflakes, import order, a bugbear subset, line length 120) and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest-xdist: a module stays on one worker (its fixtures, ports and folders are its own), handed out in the order
# tests/conftest.py gives (longest first). make test runs one worker more than there are cores: the integration
# modules spend much of their time waiting on servers and workers. `pytest tests/...` alone runs serially.
XDIST := --dist loadfile --no-loadscope-reorder
TEST_WORKERS = $$($(BIN)/python -c 'import os; print((os.cpu_count() or 1) + 1)')

test: install postgres lint  ## lint, then the whole test suite, integration included (the team stack's tests need PostgreSQL)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(XDIST)

test-fast: install lint  ## lint, then unit, data and model tests only
	$(BIN)/python -m pytest -n auto $(XDIST) -m "not integration"

# initdb on PATH or in the OS package's folder, else the package: as root, or through sudo when it needs no password.
PG_INSTALL := apt-get install -y -q --no-install-recommends postgresql
postgres:  ## PostgreSQL's server binaries (OS package) for the team stack and its tests; installs them if missing
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null; then echo "make postgres: error: PostgreSQL's server is not installed and there is no apt-get: install PostgreSQL (initdb, pg_ctl) with your system's package manager" >&2; exit 1; \
	elif [ "$$(id -u)" = 0 ]; then export DEBIAN_FRONTEND=noninteractive; $(PG_INSTALL) || { apt-get update -q && $(PG_INSTALL); }; \
	elif sudo -n true 2>/dev/null; then sudo DEBIAN_FRONTEND=noninteractive $(PG_INSTALL) || { sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive $(PG_INSTALL); }; \
	else echo "make postgres: error: PostgreSQL's server is not installed; run: sudo apt-get install -y --no-install-recommends postgresql" >&2; exit 1; fi

stack-up: install postgres  ## team stack on loopback: PostgreSQL, mlflow server :5000, prefect server :4200 (deploy/stack/README.md)
	deploy/stack/stack.sh up

stack-down:  ## stop the team stack
	deploy/stack/stack.sh down

serve: install  ## BentoML service for @champion on http://127.0.0.1:3000
	$(BIN)/lmforge serve

serve-grpc: install  ## gRPC server for @champion on 127.0.0.1:50051 (deploy/grpc_server.py; the same model and limits as `make serve`)
	$(BIN)/lmforge serve --grpc

bento: install  ## a Bento of @champion that serves without the project or a tracking store (lmforge build; bentoml serve lmforge:latest)
	$(BIN)/lmforge build

grpc-stubs: install  ## regenerate deploy/lmforge_pb2*.py from deploy/lmforge.proto (commit them; run after editing the .proto)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. deploy/lmforge.proto

ui: install  ## MLflow UI on the embedded store, http://127.0.0.1:5000 (or the URL of the tracking server in MLFLOW_TRACKING_URI)
	$(BIN)/lmforge ui

prefect-ui: install  ## Prefect UI on every flow and task run recorded in .prefect/, http://127.0.0.1:4200 (or the server in PREFECT_API_URL)
	$(BIN)/lmforge ui --prefect

check: install  ## validate all of params.yaml; dvc.yaml deps and params against the code
	$(BIN)/lmforge check

check-lock: install  ## seconds, no training: name every code/params dependency whose hash in dvc.lock is stale
	$(BIN)/lmforge check-lock

deps: install  ## regenerate dvc.yaml's code deps and params from the stages' imports
	$(BIN)/lmforge deps --write

# uv keeps the current pins where pyproject.toml still allows them; `make constraints UPGRADE=--upgrade` moves every
# package to its newest allowed release. uv comes with the dev extra; a .venv without it gets it here.
UPGRADE ?=
constraints:  ## recompile constraints.txt from pyproject.toml (every extra) with hashes: uv pip compile --generate-hashes
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --all-extras --generate-hashes --python-version 3.11 \
		--find-links $(TORCH_WHEELS) --custom-compile-command 'make constraints' $(UPGRADE) --quiet -o constraints.txt
