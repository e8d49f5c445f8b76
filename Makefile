# SpecECD: `make demo` runs the system on the demo pair; `make test` runs the test suite.
# Both create the virtual environment and install the project first (once).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (on this project's machines it installs from local disk).
# On a CUDA machine: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH_SPEC ?= torch==2.13.0
PROMPT ?=

# llama.cpp for the edge's GGUF draft (extra [llamacpp]). PyPI ships llama-cpp-python as source
# only, so it is built ONCE per (version, flags, machine) into a wheel folder under the cache and
# installed from there; a fresh venv (CI) reuses that wheel instead of a ~15 min rebuild.
# The flags must not be llama.cpp's default GGML_NATIVE=ON: on some VMs the CPU advertises
# AVX-512/AMX it cannot run (SIGILL at the first eval), and a wheel built natively on one machine
# dies on a smaller one. x86_64: AVX2+FMA+F16C when the CPU has them, else the SSE baseline;
# aarch64 (Raspberry Pi, Jetson CPU): generic ARMv8 NEON; macOS: llama.cpp's defaults (Metal).
# Another device: make LLAMA_CMAKE_ARGS='-DGGML_CUDA=on' (Jetson, CUDA), see deploy/README.md.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)
ifeq ($(UNAME_S),Darwin)
LLAMA_CMAKE_ARGS ?=
else ifeq ($(UNAME_M),x86_64)
LLAMA_CMAKE_ARGS ?= $(if $(shell grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && echo y),-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON,-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF)
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
endif
SPECECD_CACHE ?= $(HOME)/.cache/spececd
LLAMA_KEY := $(shell printf '%s|%s|%s|%s' '$(LLAMA_CPP_SPEC)' '$(LLAMA_CMAKE_ARGS)' '$(UNAME_S)' '$(UNAME_M)' | cksum | cut -d' ' -f1)
LLAMA_WHEELS ?= $(SPECECD_CACHE)/wheels/llama-cpp-$(LLAMA_KEY)

.PHONY: demo test lint clean llama-wheel

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(MAKE) --no-print-directory llama-wheel
	$(PY) -m pip install --quiet --find-links '$(LLAMA_WHEELS)' -e '.[dev,llamacpp]' '$(LLAMA_CPP_SPEC)'
	touch $@

# Build the llama-cpp-python wheel unless this (version, flags, machine) already has one.
llama-wheel:
	@if ls '$(LLAMA_WHEELS)'/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "llama-cpp-python: reusing $$(ls '$(LLAMA_WHEELS)'/llama_cpp_python-*.whl)"; \
	else \
		echo "llama-cpp-python: building $(LLAMA_CPP_SPEC) once with CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' (about 15 min on 2 cores)"; \
		mkdir -p '$(LLAMA_WHEELS)' && \
		CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip wheel --quiet --no-deps --no-cache-dir '$(LLAMA_CPP_SPEC)' -w '$(LLAMA_WHEELS).tmp' && \
		mv '$(LLAMA_WHEELS).tmp'/llama_cpp_python-*.whl '$(LLAMA_WHEELS)'/ && rm -rf '$(LLAMA_WHEELS).tmp'; \
	fi

demo: $(VENV)/.installed
	$(PY) -m bench.demo $(if $(PROMPT),"$(PROMPT)")

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
