# Two commands for a fresh machine (see README):  make demo   |   make test
# Both create .venv, install pinned torch (CPU wheel) and the package with its C++
# extension, then run the demo or the test suite.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.6.0

.PHONY: setup demo test bench lint clean

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

bench: setup
	$(PY) bench/ops_bench.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info edgeprune_fast/_C*.so
