# `make test` / `make bench` from a fresh clone: each step leaves a stamp in .stamps/ and is
# skipped while its inputs are unchanged. The package ends up installed into .venv in editable
# mode, so `.venv/bin/lotus`, `python -m lotus` and `python benchmarks/bench_<name>.py` work with
# the venv's python from anywhere, without PYTHONPATH (the recipes below use no PYTHONPATH either,
# so the tests check the install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .stamps
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: setup build install test test-fast bench bench-full clean

setup: $(STAMP)/venv
build: $(STAMP)/build
install: $(STAMP)/install

$(STAMP)/venv: requirements.txt
	@mkdir -p $(STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# Compiles lotus_kernels/_C (C++) and, where nvcc exists, lotus_kernels/_cuda, in place; ninja
# recompiles only the sources that changed.
$(STAMP)/build: $(STAMP)/venv setup.py $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

# Editable install of the package into .venv (metadata, the `lotus` script, an import path to this
# tree). The extensions were built in place just above, so LOTUS_BUILD_EXT=0 stops pip compiling
# them a second time; --no-deps: requirements.txt already installed them.
$(STAMP)/install: $(STAMP)/build pyproject.toml setup.py
	LOTUS_BUILD_EXT=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

# pytest exits 5 when it collected nothing: that must fail, never pass as "no tests".
test: $(STAMP)/install
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: $(STAMP)/install
	$(PY) -m pytest tests -m "not slow" -x -q

# The main job on embedded defaults (no download): the token-drop train-step benchmark, then a short
# block-sparse linear run (-> benchmarks/results/block_sparse_linear_short.*).
bench: $(STAMP)/install
	$(PY) benchmarks/bench_token_drop.py
	$(PY) benchmarks/bench_sparse_linear.py --sections block --short --no-progress

clean:
	rm -rf build $(STAMP) lotus_kernels/*.so

# The first thing to run on a lent GPU: builds for that GPU with the machine's own python3 and torch
# (no venv, no pip), runs every GPU test (`pytest -m cuda`) and the GPU benchmarks within ~8 minutes,
# writes benchmarks/results/gpu/ and prints a summary of ratios vs goals last. Without a GPU: one
# line, exit 0.
.PHONY: gpu-check
gpu-check:
	@$(PYTHON) benchmarks/gpu_check.py
