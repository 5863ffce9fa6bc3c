# `make test` / `make bench` from a fresh clone: each step leaves a stamp in .stamps/ and is
# skipped while its inputs are unchanged. The package ends up installed into .venv in editable
# mode, so `.venv/bin/lotus`, `python -m lotus` and `python benchmarks/bench_<name>.py` work with
# the venv's python from anywhere, without PYTHONPATH (the recipes below use no PYTHONPATH either,
# so the tests check the install). `make test-oldest` runs the same suite against the oldest supported
# versions (requirements-oldest.txt) in a venv and a copy of the tree of its own.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .stamps
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: setup build install lint format test test-fast test-oldest gpu-check-dry-run bench bench-full clean

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

# Style, before the suite (seconds): ruff (lint + format, pyproject.toml) over the Python, clang-format
# (.clang-format) over the C++ / CUDA C++. `make format` rewrites what `make lint` would reject.
CFILES = $(shell git ls-files 'csrc/*' 'tests/cuda_emulation/*' | grep -E '\.(cpp|cu|cuh|h)$$')

lint: $(STAMP)/venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CFILES)

format: $(STAMP)/venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CFILES)

# pytest exits 5 when it collected nothing: that must fail, never pass as "no tests".
test: lint $(STAMP)/install
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: $(STAMP)/install
	$(PY) -m pytest tests -m "not slow" -x -q

# The main job on embedded defaults (no download): the token-drop train-step benchmark, then a short
# block-sparse linear run (-> benchmarks/results/block_sparse_linear_short.*).
bench: $(STAMP)/install
	$(PY) benchmarks/bench_token_drop.py
	$(PY) benchmarks/bench_sparse_linear.py --sections block --short --no-progress

# The oldest end of the supported range (lotus_kernels/_version.py): Python 3.10, torch 2.11,
# triton 3.6, timm 1.0.15. The extensions of one tree are built for one torch, so the suite runs in a
# copy of the working tree (tracked + untracked-but-not-ignored files) under build/oldest, which keeps
# its own build/ (tar keeps the sources' times) so ninja recompiles only what changed. CUDA C++ is compiled there too (for sm_90
# only: the lent GPU's), so a torch 2.11 header incompatibility fails here, not on the GPU.
OLDEST_PYTHON ?= $$(sh tools/find_python.sh 3.10)
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(CURDIR)/$(OLDEST_VENV)/bin/python
OLDEST_TREE := build/oldest

$(STAMP)/oldest-venv: requirements-oldest.txt
	@mkdir -p $(STAMP)
	test -x $(OLDEST_PY) || { py=$(OLDEST_PYTHON) && $$py -m venv $(OLDEST_VENV); }
	$(OLDEST_PY) -m pip install -q --disable-pip-version-check -r requirements-oldest.txt
	@touch $@

test-oldest: $(STAMP)/oldest-venv
	@mkdir -p $(OLDEST_TREE)
	find $(OLDEST_TREE) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z --cached --others --exclude-standard | \
	  while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done | \
	  tar --null -T - -cf - | tar -xf - -C $(OLDEST_TREE)
	cd $(OLDEST_TREE) && TORCH_CUDA_ARCH_LIST=9.0 $(OLDEST_PY) setup.py -q build_ext --inplace
	cd $(OLDEST_TREE) && PYTHONPATH=$(CURDIR)/$(OLDEST_TREE) $(OLDEST_PY) -m pytest tests -p no:cacheprovider; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test-oldest: pytest collected no tests" >&2; fi; exit $$rc

# `make gpu-check` as the lent GPU host will run it (Python 3.12, torch 2.11, triton 3.6, pytest-xdist:
# requirements-gpuhost.txt), end to end on the CPU: the same build (C++ and CUDA C++ for sm_90), the same
# test passes (selecting no test: there is no GPU) and the benchmarks on tiny CPU sizes; then checks
# that it wrote its six result files and nothing else. The budget is an hour here: 2 cores build for
# minutes what 16 build in one (the deadlines themselves are tested in tests/test_gpu_check.py). Again in a copy of the tree with its own build.
GPUHOST_PYTHON ?= $$(sh tools/find_python.sh 3.12)
GPUHOST_VENV := .venv-gpuhost
GPUHOST_PY := $(CURDIR)/$(GPUHOST_VENV)/bin/python
GPUHOST_TREE := build/gpuhost

$(STAMP)/gpuhost-venv: requirements-gpuhost.txt
	@mkdir -p $(STAMP)
	test -x $(GPUHOST_PY) || { py=$(GPUHOST_PYTHON) && $$py -m venv $(GPUHOST_VENV); }
	$(GPUHOST_PY) -m pip install -q --disable-pip-version-check -r requirements-gpuhost.txt
	@touch $@

gpu-check-dry-run: $(STAMP)/gpuhost-venv
	@mkdir -p $(GPUHOST_TREE)
	find $(GPUHOST_TREE) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z --cached --others --exclude-standard | \
	  while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done | \
	  tar --null -T - -cf - | tar -xf - -C $(GPUHOST_TREE)
	cd $(GPUHOST_TREE) && $(GPUHOST_PY) tools/gpu_check.py --dry-run --budget 3600 --out $(CURDIR)/$(GPUHOST_TREE)/results
	cd $(GPUHOST_TREE) && $(GPUHOST_PY) -c "import json, sys; sys.path.insert(0, 'tools'); import gpu_check as g; \
	  r = json.load(open('results/gpu_check.json')); got = sorted(__import__('os').listdir('results')); \
	  assert got == sorted(g.RESULT_FILES), got; assert r['build']['ok'] and r['tests']['ok'], (r['build'], r['tests']); \
	  assert all(v.startswith('ok') for v in r['bench_status'].values()), r['bench_status']; \
	  print('gpu-check-dry-run: ok:', r['environment']['python'], 'torch', r['environment']['torch'], \
	        'triton', r['environment']['triton'], '| build', r['build']['seconds'], 's |', r['tests']['passes'])"

clean:
	rm -rf build $(STAMP) lotus_kernels/*.so lotus_kernels/_build_info.py

# The first thing to run on a lent GPU: builds for that GPU with the machine's own python3 and torch
# (no venv, no pip), runs the GPU tests and the GPU benchmarks within 300 s (tools/gpu_check.py), writes
# benchmarks/results/gpu/ (or GPU_CHECK_ARGS="--out DIR") and prints a summary of measured vs goals and
# predictions last. Without a GPU: one line, exit 0.
.PHONY: gpu-check
gpu-check:
	@$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)
