# Two commands for a fresh machine (see README):  make demo   |   make test
# Both create .venv, install pinned torch (CPU wheel) and the package with its C++
# extension, then run the demo or the test suite.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
# the GPU image's Triton (its interpreter needs numpy < 2.4)
TRITON ?= triton==3.6.0
# The second venv (make test-triton-next): a newer Triton, today's numpy and the GPU image's
# transformers, the package run from the checkout (PYTHONPATH, no compiled extension) as there
NEXT_VENV    ?= .venv-triton-next
NEXT_PY      := $(NEXT_VENV)/bin/python
NEXT_PINS    ?= triton==3.9.0 numpy==2.4.6 "transformers==5.17.*"
NEXT_TESTS   ?= tests/ops tests/models

.PHONY: setup demo test test-triton-next gpu-pytest bench lint clean tracr-compile

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install "$(TORCH)"
	$(PIP) install "$(TRITON)" "numpy<2.3" pybind11 ninja
	$(PIP) install --no-build-isolation -e ".[dev]"
	@command -v dot >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get -qq update && apt-get -qq install -y graphviz >/dev/null) || \
	  echo "note: graphviz 'dot' not installed; circuit pictures fall back to matplotlib"; }
	touch $@

demo: setup
	$(VENV)/bin/edgeprune demo

test: setup
	$(PY) -m pytest -q --durations=15

# The kernels (interpreted, and built for sm_90 without a GPU) and the model tests on the
# second venv's versions; .ci/run runs it after `make test`
test-triton-next: $(NEXT_VENV)/.installed
	PYTHONPATH=. $(NEXT_PY) -m pytest -q -p no:cacheprovider --durations=5 $(NEXT_TESTS)

$(NEXT_VENV)/.installed: Makefile
	test -x $(NEXT_PY) || python3 -m venv $(NEXT_VENV)
	$(NEXT_PY) -m pip --disable-pip-version-check -q install "$(TORCH)"
	$(NEXT_PY) -m pip --disable-pip-version-check -q install $(NEXT_PINS) safetensors tqdm pytest
	touch $@

# pytest as pure-Python wheels for Python 3.12 in .gpu-pytest/, for a GPU machine that has
# none (bench/gpu_check.sh puts the folder on PYTHONPATH when it is there)
gpu-pytest:
	python3 -m pip --disable-pip-version-check -q install --target .gpu-pytest --python-version 3.12 \
	  --only-binary=:all: --upgrade pytest

# The tracr program suite (tools/compile_tracr.py): compiled with tracr in an optional jax venv,
# shipped as data in edgeprune_fast/data/tracr/, ground truth derived from the weights (torch only)
TRACR_VENV ?= .venv-tracr
TRACR_PINS ?= tracr-pypi==1.0.0 jax==0.10.2 jaxlib==0.10.2 dm-haiku==0.0.17 safetensors
tracr-compile: setup $(TRACR_VENV)/.installed
	JAX_PLATFORMS=cpu $(TRACR_VENV)/bin/python tools/compile_tracr.py
	chmod 644 edgeprune_fast/data/tracr/*.safetensors
	$(PY) -m edgeprune_fast.tracr_truth edgeprune_fast/data/tracr

$(TRACR_VENV)/.installed:
	test -x $(TRACR_VENV)/bin/python || python3 -m venv $(TRACR_VENV)
	$(TRACR_VENV)/bin/python -m pip --disable-pip-version-check -q install $(TRACR_PINS)
	touch $@

bench: setup
	$(PY) bench/ops_bench.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(NEXT_VENV) .gpu-pytest build *.egg-info edgeprune_fast/_C*.so
