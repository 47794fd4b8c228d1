# Two commands on a fresh machine: `make demo` and `make test`. Both set up a virtual
# environment in .venv (jax, build tools), build the extension (CUDA kernels too when nvcc is
# found; JPA_CUDA=OFF|ON overrides), then run.
#
# `make test-py312`: the CPU suite again on Python 3.12 with the newest jax (what
# `pip install --upgrade jax` gives there), in its own .venv312 and a CPU-only build. The
# editable installs do not clash: scikit-build-core builds into build/{wheel_tag}
# (build/cp311-..., build/cp312-...) and its editable (redirect) mode installs the compiled
# _jpa_ffi.cpython-3XX-*.so into each venv's site-packages, not into the source tree.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JPA_CUDA ?= AUTO
# What the setup step asks pip for: the default accepts an installed jax >= 0.10; test-py312
# passes JAX_SPEC=jax JAX_UPGRADE=--upgrade for the newest release.
JAX_SPEC ?= jax>=0.10
JAX_UPGRADE ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export JPA_CUDA
export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)

.PHONY: setup build test test-py312 versions demo bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(JAX_UPGRADE) "$(JAX_SPEC)" numpy ml_dtypes pytest \
		"scikit-build-core>=0.10" "nanobind>=2.0" cmake ninja flatbuffers
	touch $@

build: setup
	@if [ "$(JPA_CUDA)" != OFF ] && command -v nvcc >/dev/null 2>&1; then \
	  echo "jax_paged_attn: building the extension with the CUDA kernels (nvcc: $$(command -v nvcc);" \
	       "sm80 family for sm_80 and sm_90, sm90 family for sm_90a), about 3-4 minutes on 2 cores;" \
	       "JPA_CUDA=OFF skips them"; \
	else \
	  echo "jax_paged_attn: building the CPU-only extension (JPA_CUDA=$(JPA_CUDA), nvcc" \
	       "$$(command -v nvcc >/dev/null 2>&1 && echo found || echo not found)), under a minute"; \
	fi
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

versions: setup
	@$(PY) -c "import sys, jax, jaxlib; print(f'== {sys.executable}: Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, JPA_CUDA=$(JPA_CUDA)')"

PYTEST_ARGS ?=

test: build versions
	$(PY) -m pytest -q --durations=12 $(PYTEST_ARGS) tests

# Python 3.12 from scripts/find_python.sh (python3.12 on PATH if it runs, else pyenv's
# ~/.pyenv/versions/3.12*). None found is an error, not a skip: CI must not go green with
# half its suites missing. Set PYTHON312=/path/to/python3.12 to choose one. Its own pytest
# cache directory: .ci/run runs it at the same time as `make test`. The fuzz suite runs a
# quarter of its 1,024 cases here by default (JPA_FUZZ_CONFIGS=16); .ci/run gives this suite
# all of them and `make test` the quarter, which balances the two parallel suites.
PYTHON312 ?= $(shell scripts/find_python.sh 3.12)
VENV312 ?= .venv312

test-py312:
	@test -n "$(PYTHON312)" || { echo "make test-py312: no Python 3.12 found (scripts/find_python.sh 3.12); set PYTHON312=" >&2; exit 1; }
	JPA_FUZZ_CONFIGS=$${JPA_FUZZ_CONFIGS:-16} \
	$(MAKE) test PYTHON="$(PYTHON312)" VENV=$(VENV312) JPA_CUDA=OFF JAX_SPEC=jax JAX_UPGRADE=--upgrade \
		PYTEST_ARGS="-o cache_dir=.pytest_cache_py312"

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf build $(VENV) $(VENV312) jax_paged_attn/_jpa_ffi*.so
