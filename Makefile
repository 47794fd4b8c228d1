# Two commands on a fresh machine: `make demo` and `make test`. Both set up a virtual
# environment in .venv (jax, build tools), build the extension (CUDA kernels too when nvcc is
# found; JPA_CUDA=OFF|ON overrides), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JPA_CUDA ?= AUTO
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export JPA_CUDA
export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)

.PHONY: setup build test demo bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "jax>=0.10" numpy ml_dtypes pytest "scikit-build-core>=0.10" \
		"nanobind>=2.0" cmake ninja flatbuffers
	touch $@

build: setup
	@if [ "$(JPA_CUDA)" != OFF ] && command -v nvcc >/dev/null 2>&1; then \
	  echo "jax_paged_attn: building the extension with the CUDA kernels (nvcc: $$(command -v nvcc);" \
	       "sm80 family for sm_80 and sm_90), about 3-4 minutes on 2 cores; JPA_CUDA=OFF skips them"; \
	else \
	  echo "jax_paged_attn: building the CPU-only extension (JPA_CUDA=$(JPA_CUDA), nvcc" \
	       "$$(command -v nvcc >/dev/null 2>&1 && echo found || echo not found)), under a minute"; \
	fi
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf build $(VENV) jax_paged_attn/_jpa_ffi*.so
