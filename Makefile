# An index of the project's commands (not a build system). Run inside the venv of the README.
PY ?= python
PYTEST = $(PY) -m pytest

.PHONY: test lint test-ref test-sim test-nvrtc docs gpu-test bench-reference clean

## The README's test command: lint, the shared suite (reference, and any backend this machine
## runs), the same suite for the numba backend in Numba's CUDA simulator, and the docs with
## every tutorial executed. The NVRTC build of every CUDA kernel is its own step (test-nvrtc,
## run by .ci/run): minutes on a 2-core machine, and a CPU user cannot run the kernels anyway.
test: lint test-ref test-sim docs

lint:
	$(PY) -m ruff check .

test-ref:
	$(PYTEST) -q -m "not slow and not nvrtc"

test-sim:
	NUMBA_ENABLE_CUDASIM=1 UNISPARSE_TEST_BACKENDS=numba $(PYTEST) -q -m "not gpu and not slow" -k numba

test-nvrtc:
	$(PYTEST) -q -m nvrtc tests/test_cupy_compile.py

docs:
	$(PY) -m sphinx -n -W --keep-going -b html docs docs/_build/html

## On a machine with an NVIDIA GPU: every backend, full sizes, sanitizers, the big checks.
gpu-test:
	bash scripts/gpu_test.sh

bench-reference:
	$(PY) benchmarks/bench_reference.py

clean:
	rm -rf docs/_build docs/tutorials build dist *.egg-info
