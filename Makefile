# make run   - set up .venv, then run the pipeline (dvc repro)
# make test  - set up .venv with test deps, then run the tests
# make exps  - the experiments table, fitted to the terminal: name, changed params, test AUC, sensitivity, specificity, F1
# make plots - write dvc_plots/index.html (or PLOTS_DIR=dir), a plots page that opens with no network
# make bench - time the project's training against plain fit and the compute floor (BENCH_ARGS="--epochs 2" to shrink;
#              BENCH_ARGS=--full-data: peak memory of the real stages on the whole dataset)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DVC runs each stage as `python -m stages.<name>`: that python must be the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
TF_VERSION := 2.21.0
MEDMNIST_VERSION := 3.0.2
PLOTS_DIR ?= dvc_plots
BENCH_ARGS ?=
# The README's `dvc exp show` command ($$ is how make writes $).
EXP_SHOW := dvc exp show --no-pager --only-changed --drop '.*/|Created|test|val\.|calibration' --keep 'test\.(roc_auc|recall|specificity|f1)$$'

.PHONY: run test exps plots bench setup clean-venv

$(VENV)/.runtime: requirements.txt Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed (set PYTHON=python3.x)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing tensorflow[and-cuda]"; tf="tensorflow[and-cuda]==$(TF_VERSION)"; \
	else \
		echo "no GPU found: installing tensorflow (CPU)"; tf="tensorflow==$(TF_VERSION)"; \
	fi; \
	$(BIN)/pip install -q -r requirements.txt "$$tf"
	$(BIN)/pip install -q --no-deps medmnist==$(MEDMNIST_VERSION)
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	@touch $@

setup: $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/dvc repro

test: $(VENV)/.dev
	$(BIN)/python -m pytest

exps: $(VENV)/.runtime
	$(BIN)/$(EXP_SHOW)

plots: $(VENV)/.runtime
	$(BIN)/python -m pneumonia.plots_page $(PLOTS_DIR)

bench: $(VENV)/.runtime
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
