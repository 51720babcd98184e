# Two commands: `make demo` (the main job, end to end on the embedded corpus) and `make test` (the suite).
# Both create .venv and install everything from nothing on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.alpro-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed: pure-Python install; ops are JIT-built only when used (we use none on CPU).
export DS_BUILD_OPS := 0
EXTRAS ?= dev,dali

.PHONY: install test test-fast demo lint bench clean-demo gpu-check

install: $(STAMP)

# torch + torchvision first (local wheels, no download), then everything else under the constraints file so
# nothing can pull another torch. deepspeed builds from an sdist that imports torch: no build isolation.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt numpy setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -c constraints.txt deepspeed
	$(PIP) install -q --no-build-isolation -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, timm, transformers, deepspeed, webdataset, av; print('installed: torch', torch.__version__)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

# Everything but the tests that spawn the trainer, torchrun, the demo or the sharder (marked slow by the rule in
# tests/conftest.py; CUDA-only tests skip with their reason on CPU).
test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

lint: install
	$(VENV)/bin/ruff check alpro kernels sharding benchmarks tests

# On a CUDA GPU: the first-GPU-hour check (kernels' numerics and speed, DALI NVDEC vs PyAV, 30 alpro-base steps),
# <= 8 min, rows in benchmarks/results/gpu_check.{json,csv,png}. Without CUDA: the smoke mode (interpreter, tiny).
gpu-check: install
	$(PY) benchmarks/gpu_check.py

demo: install
	$(VENV)/bin/alpro demo --out demo_out

clean-demo:
	rm -rf demo_out
