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

$(DEPS): requirements-dev.txt
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
