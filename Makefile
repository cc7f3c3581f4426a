# Two commands for a fresh machine (README): `make run` (verify + benchmark) and `make test`.
# Each creates the virtual environment, installs the pinned dependencies and builds the
# extension first, once; later runs redo only what changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.stamp-deps
BUILD := $(VENV)/.stamp-build
SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml
OUT ?= bench-out

# torch guesses CUDA_HOME from nvcc's folder; point it at the toolkit when there is one.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= 2

.PHONY: run test lint bench-suite clean

# The pinned torch is a CUDA build: about 6 GB in the venv. Say so up front when the disk is short
# (pip's own "No space left on device" comes minutes later, without the numbers).
$(DEPS): requirements-dev.txt
	@free_kb=$$(df -Pk . | awk 'NR == 2 { print $$4 }'); \
	if [ "$${free_kb:-0}" -lt 7340032 ]; then \
	  echo "warning: $$((free_kb / 1024)) MiB free on this disk; the venv needs about 6 GiB" >&2; fi
	@# The pins need Python 3.11+ (numpy 2.4, matplotlib 3.11, onnxruntime 1.32, hypothesis 6.170
	@# have no 3.10 wheels): say so here, not as pip's "No matching distribution" minutes later.
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())');" \
	    "the pinned environment (requirements-dev.txt) needs 3.11 or newer: make PYTHON=python3.11 ..." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(BUILD): $(DEPS) $(SOURCES)
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

run: $(BUILD)
	$(BIN)/bam-fused info
	$(BIN)/bam-fused verify --quick
	$(BIN)/bam-fused bench --quick --out $(OUT)

# Every test, slow ones too (pytest -m "not slow" skips the 64-bit indexing test).
test: $(BUILD)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(DEPS)
	$(BIN)/ruff check .

bench-suite: $(BUILD)
	$(BIN)/python -m pytest -q benchmarks

clean:
	rm -rf $(VENV) build *.egg-info bam_fused/_C*.so $(OUT)
