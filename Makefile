# `make test` and `make demo` set everything up on a fresh machine (venv, pinned stack, CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.package-built

.PHONY: install test test-fast demo clean

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The package is installed editable; _C is rebuilt whenever its sources or the build files change.
$(BUILT): $(DEPS) setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILT)

test: install
	$(PY) -m pytest -q --durations=15

demo: install
	$(PY) -m dtq_kernels.demo

clean:
	rm -rf build $(VENV) dtq_kernels/_C*.so *.egg-info
