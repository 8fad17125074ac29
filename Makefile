# Two commands on a fresh machine: `make run` (the main job) and `make test` (the CPU test suite).
# Both build, once, a virtual environment outside the checkout, keyed by requirements.txt, so that
# fresh clones (CI) reuse it and a changed requirements file builds a new one.

SHELL := /bin/bash
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/llmtrain/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
# Python >= 3.12: pyenv's 3.12 where pyenv is installed (its bare shim needs PYENV_VERSION), else python3.12.
PYTHON312 ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null) \
	python3.12 python3; do "$$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null \
	&& { echo "$$p"; break; }; done)
RUN := PYTHONPATH=$(CURDIR) $(PY)
TEST_ARGS ?= -m "not slow and not gpu" --durations=40

.PHONY: run test test-all venv bench bench-data clean-venv

run: $(VENV)/.ready
	$(RUN) -m llmtrain $(ARGS)

test: $(VENV)/.ready
	$(RUN) -m pytest -q $(TEST_ARGS) tests

# Throughput beside a bare Megatron-Core step and a transformers step (GPU): make bench ARGS="model=..."
bench: $(VENV)/.ready
	$(RUN) -m llmtrain.bench $(ARGS)

test-all: $(VENV)/.ready
	$(RUN) -m pytest -q tests

# Tokenization throughput on all cores as a ratio to the tokenizer's own encode_batch.
bench-data: $(VENV)/.ready
	$(RUN) scripts/bench_data.py $(BENCH_ARGS)

venv: $(VENV)/.ready

# The venv's path carries requirements.txt's hash, so a changed file builds a new one; no
# dependency on the file's date (a fresh clone's files are always newer than the venv).
$(VENV)/.ready:
	@test -n "$(PYTHON312)" || { echo "llmtrain needs Python >= 3.12: install python3.12 (or pyenv install 3.12)"; exit 1; }
	rm -rf $(VENV)
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

clean-venv:
	rm -rf $(VENV)
