# explaind: one entry point for the environment, the data, the pipeline and the tests.
#
#   make repro    create .venv, install explaind with its extras, rebuild data/, run `dvc repro`
#   make test     the same setup, then the whole pytest suite (unit, notebooks, end-to-end)
#
# Needs nothing but Python >= 3.10 with pip (and make). Every target is idempotent: setup is
# skipped while its stamp is newer than pyproject.toml, data/ is only re-hashed when it exists,
# and `dvc repro` only reruns stages whose dependencies or parameters changed.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# --- knobs (override on the command line: `make test PYTHON=python3.11`) ----------------------
# Interpreter that creates the virtual environment.
PYTHON ?= python3
# Where the virtual environment lives.
VENV ?= .venv
# pyproject extras to install: dev = pipeline (dvc, papermill, plotting) + test tools.
EXTRAS ?= dev
# Jupyter kernel that the pipeline's papermill runs use (registered inside the venv).
KERNEL ?= explaind
# Extra pytest arguments, e.g. PYTEST_ARGS="-k pipeline -x" (or "-n 0" to run in one process).
PYTEST_ARGS ?=
# pytest-xdist workers. The notebook and end-to-end tests share one `dvc repro` and so run on one
# worker (--dist loadgroup), the longest part of the suite; the rest fits beside it on a second.
TEST_WORKERS ?= 2
# Extra package index for torch: PyTorch's wheel index for your CUDA version, for a CUDA build.
TORCH_INDEX ?=

BIN := $(CURDIR)/$(VENV)/bin
# pyproject.toml's torch requirement, for installing torch alone from TORCH_INDEX
TORCH_PIN := $(shell sed -n 's/^ *"\(torch[^"]*\)".*/\1/p' pyproject.toml)
STAMP := $(VENV)/.explaind-setup
# The knobs setup was run with: setup reruns when they change, not only when pyproject.toml does.
SETTINGS := $(VENV)/.explaind-settings
# dvc.yaml's commands call `python`: make sure that is the environment's interpreter.
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup data repro repro-paper test plots clean-venv FORCE

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

setup: $(STAMP)  ## create .venv, install explaind[dev], register the Jupyter kernel

# Rebuilt only when pyproject.toml or the knobs change (or the stamp is deleted).
$(STAMP): pyproject.toml $(SETTINGS)
	@test -n "$(EXTRAS)" || { echo "EXTRAS is empty, but the pipeline and the tests need explaind[pipeline] or [dev]: leave EXTRAS=dev (the default)"; exit 1; }
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "explaind needs Python >= 3.10, got " + sys.version'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e ".[$(EXTRAS)]"
	@# a torch already installed satisfies the pin, so pip would keep it: take the index's build in its place
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet --upgrade --extra-index-url $(TORCH_INDEX) "$(TORCH_PIN)")
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))" > /dev/null
	@touch $@
	@echo "setup done: $(VENV) with explaind[$(EXTRAS)] and Jupyter kernel '$(KERNEL)'"

# rewritten only when the knobs differ from the last setup's, so that an unchanged setup stays done
$(SETTINGS): FORCE
	@mkdir -p $(VENV)
	@echo 'EXTRAS=$(EXTRAS) TORCH_INDEX=$(TORCH_INDEX)' | cmp -s - $@ || echo 'EXTRAS=$(EXTRAS) TORCH_INDEX=$(TORCH_INDEX)' > $@

data: setup  ## rebuild data/ (dvc pull with a remote, else the export) and check it against data.dvc
	$(BIN)/python -m explaind.pipeline data

repro: setup data  ## run the whole DVC pipeline (params.yaml)
	@# every stage's parameters first: dvc would reach a later stage's mistake only after the earlier stages ran
	$(BIN)/python -m explaind.pipeline check
	$(BIN)/dvc repro

repro-paper: setup data  ## run the pipeline as a DVC experiment with the paper profile (GPU)
	@# the arguments first: a profile that fails its checks (no CIFAR-10 in data/, no GPU here) stops
	@# here, before `dvc exp run` writes its values into params.yaml, where a failing substitution
	@# inside the command would run `dvc exp run` with no -S, the CPU profile
	args=$$($(BIN)/python -m explaind.pipeline set-args params_paper.yaml); set -f; $(BIN)/dvc exp run $$args

plots: setup  ## render the training curves to dvc_plots/index.html
	@ls reports/train_*/curves.csv > /dev/null 2>&1 || { echo "no training curves in reports/: run make repro first"; exit 1; }
	$(BIN)/dvc plots show

test: setup  ## run the whole test suite
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

clean-venv:  ## delete the virtual environment (the next target recreates it)
	rm -rf $(VENV)
