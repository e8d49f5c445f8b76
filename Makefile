# SpecECD: `make demo` runs the system on the demo pair; `make test` runs the test suite.
# Both create the virtual environment and install the project first (once).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (on this project's machines it installs from local disk).
# On a CUDA machine: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH_SPEC ?= torch==2.13.0
PROMPT ?=

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m bench.demo $(if $(PROMPT),"$(PROMPT)")

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
