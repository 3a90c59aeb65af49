# fastcap: the README's commands. `make install` is idempotent and fast the second time.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastcap-installed
DATA ?= data/shapes
RUN ?= runs/shapes-tiny
ARGS ?=

.PHONY: install train scst test test-fast bench gpu-check gpu-wheels lint format clean venv-low \
	test-low gpu-check-dry

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
	$(BIN)/python -m pip install -q -e ".[dev,lite]"
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

# The low end of the supported range (pyproject.toml), as the lent H200 machine has it: Python
# 3.12, torch 2.11, Triton 3.6 and no DeepSpeed, in a second ignored venv. Run before a release;
# results in bench/RESULTS.md. torch 2.11 comes from PyPI (a CUDA 13 build: about 4 GB with its
# nvidia-* wheels, most of them on this machine's disk).
LOW := .venv-low
LOW_PY ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null \
  && echo python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)
# numpy < 2.4: Triton 3.6's interpreter turns 1-element arrays into Python scalars, an error
# from NumPy 2.4 on (every kernel fails under TRITON_INTERPRET=1; compiled kernels do not care)
LOW_PINS := torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
venv-low: $(LOW)/.fastcap-installed
$(LOW)/.fastcap-installed: pyproject.toml Makefile
	@test -n "$(LOW_PY)" || { echo "venv-low needs a python3.12 (set LOW_PY)"; exit 1; }
	@test -x $(LOW)/bin/python || $(LOW_PY) -m venv $(LOW)
	$(LOW)/bin/python -m pip install -q --upgrade pip
	$(LOW)/bin/python -m pip install -q $(LOW_PINS)
	# fastcap without DeepSpeed, W&B and pycocoevalcap (the GPU machine lacks them), then the
	# rest of its dependencies at whatever versions resolve beside the low pins
	$(LOW)/bin/python -m pip install -q --no-deps -e .
	$(LOW)/bin/python -m pip install -q $(LOW_PINS) tokenizers pillow tqdm numpy pyyaml ninja \
	  "safetensors>=0.8" fastapi uvicorn python-multipart pytest httpx
	@touch $@

# what the low end must pass: the fake-CUDA module, the kernels' interpreter tests, the
# gpu_check dry run's test and the compile-only table (Triton 3.6's ptxas and cuobjdump)
LOW_TESTS ?= tests/test_fake_cuda.py tests/test_attention.py tests/test_moe.py \
  tests/test_siglip.py tests/test_lce.py tests/test_custom_ops.py tests/test_gpu_check.py \
  tests/test_gpu_compile.py
test-low: venv-low
	$(LOW)/bin/python -m pytest -q -ra -x $(LOW_TESTS)

# The device machine rehearsed on this CPU: `gpu_check --dry-run` under .venv-low (Python 3.12,
# torch 2.11, Triton 3.6, no DeepSpeed), the DeepSpeed wheels of .gpu-wheels installed with pip
# --target, no network but the loopback (bench/gpu_check/offline) and no package index
gpu-check-dry: venv-low
	@test -n "$$(ls $(GPU_WHEELS)/*.whl 2>/dev/null)" || $(MAKE) gpu-wheels
	PIP_NO_INDEX=1 sh bench/gpu_check/offline $(LOW)/bin/python bench/gpu_check --dry-run \
	  --out runs/gpu-check-dry --wheels $(GPU_WHEELS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs data .pytest_cache .benchmarks
