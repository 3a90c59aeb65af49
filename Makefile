# fastcap: the README's commands. `make install` is idempotent and fast the second time.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastcap-installed
DATA ?= data/shapes
RUN ?= runs/shapes-tiny
ARGS ?=

.PHONY: install train scst test test-fast bench gpu-check gpu-wheels lint format clean

# the browser test (tests/test_serve.py) drives Debian's headless Chromium through its
# ChromeDriver; installed once as root (CI), then found on PATH and skipped in a moment
install: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver (for the browser test)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: pip takes them from this machine's disk (about a minute)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

$(DATA)/dataset.json: | $(STAMP)
	$(BIN)/fastcap-data shapes --out $(DATA)

train: install $(DATA)/dataset.json
	$(BIN)/fastcap-train --preset shapes-tiny --data shapes:$(DATA) --out $(RUN) $(ARGS)

# self-critical fine-tuning of the make-train run on its own samples' CIDEr-D (README, SCST)
SCST_RUN ?= $(RUN)-scst
SCST_ARGS ?= --steps 300 --batch-size 32 eval_every=100
scst: install
	$(BIN)/fastcap-train --scst --init $(RUN) --out $(SCST_RUN) $(SCST_ARGS) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: install
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python -m pytest bench/ --benchmark-only -q

# a bare CUDA machine has torch and Triton but no DeepSpeed: the train stage installs it from
# .gpu-wheels (`make gpu-wheels` here, then carry the folder to the machine)
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) bench/gpu_check --out runs/gpu-check

# DeepSpeed and what it imports, as wheels for the GPU machine's Python, into an ignored folder
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= 3.12
gpu-wheels: install
	$(BIN)/python bench/gpu_check/wheels.py --out $(GPU_WHEELS) --python-version $(GPU_PYTHON)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs data .pytest_cache .benchmarks
