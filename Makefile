# make run   - set up .venv, then run the pipeline (dvc repro)
# make quick - set up .venv, then a quick look on a CPU: the whole pipeline at 64 px with 3 + 3 epochs, as the
#              experiment quick-look (QUICK_ARGS="-S ..." to add params)
# make recipe SEED=11 - the CPU reference recipe (from scratch, 64 px, augmented; results/reference/README.md) as
#              the experiment recipe-s<SEED>, 50-70 minutes on 2 cores (RECIPE_ARGS="-S data.source=..." offline)
# make test  - set up .venv with test deps, then run the tests (all but the benchmark tools' whole runs)
# make test-tools - those whole runs at tiny settings: make bench's timing and --full-data modes, the gpu-check dry run
# make test-fast - the unit tests only, for the edit loop (no DVC pipeline runs, no training processes)
# make exps  - the experiments table, fitted to the terminal: name, changed params, test AUC, sensitivity, specificity, F1
# make ensemble EXPS="seed-1 seed-2 seed-3" - mean ± std of their test metrics, their ensemble and the calibration
#              methods compared (python -m pneumonia.report --calibration); the experiments must differ only by seed.
#              No EXPS: every experiment of the commit. On stdout: make -s ensemble EXPS=... > report.txt keeps it
#              EXPS may name run folders instead (results/reference/.../seed-*: params.yaml, metrics.json, predictions.csv)
# make plots - write dvc_plots/index.html (or PLOTS_DIR=dir), a plots page that opens with no network
# make export - models/serving (or EXPORT_DIR=dir): the trained model as a TensorFlow SavedModel taking uint8 pixels,
#              with metrics/metrics.json's calibration and threshold built in (pneumonia/export.py)
# make bench - time the project's training against plain fit and the compute floor (BENCH_ARGS="--epochs 2" to shrink;
#              BENCH_ARGS=--full-data: peak memory of the real stages on the whole dataset)
# make gpu-check - on a CUDA machine: the whole pipeline at 224 px from scratch, then phase 2 alone on each path (the
#              float16 conv5 cache, its augmented views, the whole network augmented), offline, in a temporary copy,
#              against the GPU's own floors (bench/results_gpu.json). Uses the machine's own python and packages
#              (TensorFlow, else JAX), nothing from the internet: GPU_CHECK_ARGS="--data path/to.npz --wheels wheels"
# make gpu-wheels - where there is internet: wheels/ for gpu-check --wheels on a Python 3.12 machine without it
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DVC runs each stage as `python -m stages.<name>`: that python must be the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
TF_VERSION := 2.21.0
MEDMNIST_VERSION := 3.0.2
PLOTS_DIR ?= dvc_plots
QUICK_ARGS ?=
SEED ?= 42
RECIPE_ARGS ?=
EXPS ?=
EXPORT_DIR ?= models/serving
BENCH_ARGS ?=
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
# Wheels a JAX machine always has already (JAX needs them), left out of the bundle.
GPU_WHEELS_SKIP ?= numpy scipy
# The README's `dvc exp show` command ($$ is how make writes $).
EXP_SHOW := dvc exp show --no-pager --only-changed --drop '.*/|Created|test|val\.|calibration' --keep 'test\.(roc_auc|recall|specificity|f1)$$'

.PHONY: run quick recipe test test-tools test-fast exps ensemble plots export bench gpu-check gpu-wheels setup clean-venv

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

# tests/test_plots_page.py renders the plots page in Debian's chromium: installed here, where root has apt-get.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium (apt-get) for tests/test_plots_page.py"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || echo "apt-get install chromium failed"; \
	fi
	@touch $@

setup: $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/dvc repro

# Every stage and output, at 64 px: minutes on a laptop CPU where the defaults (224 px, 10 + 10 epochs) take hours.
quick: $(VENV)/.runtime
	$(BIN)/dvc exp run -n quick-look -S image_size=64 -S train_head.epochs=3 -S fine_tune.epochs=3 $(QUICK_ARGS)

# The CPU reference recipe, chosen on validation (results/reference/README.md).
recipe: $(VENV)/.runtime
	$(BIN)/dvc exp run -n recipe-s$(SEED) -S seed=$(SEED) -S model.weights=none -S image_size=64 \
		-S train_head.epochs=0 -S fine_tune.epochs=20 -S fine_tune.lr=1e-3 -S fine_tune.patience=20 \
		-S fine_tune.keep=val_loss -S fine_tune.schedule=cosine -S augment.enabled=true -S evaluate.tta=8 $(RECIPE_ARGS)

# Two workers: most of a test's time is single-threaded (process start-up, imports, tracing, DVC itself).
# The whole runs of the benchmark tools (make bench, make gpu-check) are make test-tools; CI runs both.
test: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15 -m "not tools"

test-tools: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 --durations=5 -m tools

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 -m "not slow"

exps: $(VENV)/.runtime
	$(BIN)/$(EXP_SHOW)

ensemble: $(VENV)/.runtime
	$(BIN)/python -m pneumonia.report --calibration $(EXPS)

plots: $(VENV)/.runtime
	$(BIN)/python -m pneumonia.plots_page $(PLOTS_DIR)

export: $(VENV)/.runtime
	$(BIN)/python -m pneumonia.export --output $(EXPORT_DIR)

bench: $(VENV)/.runtime
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Built where there is internet, for a Python 3.12 Linux x86-64 GPU machine without it (gpu-check --wheels wheels).
# antlr4-python3-runtime (DVC needs it through hydra) is published as source only: it is built here as a wheel.
gpu-wheels: $(VENV)/.runtime
	$(BIN)/pip wheel -q --no-deps -w wheels antlr4-python3-runtime==4.9.3
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --find-links wheels --dest wheels -r requirements.txt
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --no-deps --dest wheels medmnist==$(MEDMNIST_VERSION)
	cd wheels && for name in $(GPU_WHEELS_SKIP); do rm -f $$name-[0-9]*.whl; done; ls | wc -l; du -sh .

# No setup step: a GPU machine may have no internet for pip, and has its own TensorFlow or JAX.
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
