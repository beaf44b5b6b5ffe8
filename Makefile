# Two commands on a fresh Debian machine:  make demo   and   make test
# Both install what they need (Debian packages, a virtual environment made
# from the system Python with its site packages so that `import nbd` works,
# and the build) and are quick to re-run when nothing changed.

SYSTEM_PYTHON ?= /usr/bin/python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
STAMPS        := .stamps
PIP_PACKAGES  := "cython>=3.0" numpy "scikit-build-core>=0.8" pytest pytest-benchmark \
                 hypothesis xxhash ruff mypy cython-lint matplotlib
SOURCES       := $(wildcard pyx/*.pyx pyx/*.pxd) CMakeLists.txt pyproject.toml
PYTEST_ARGS   ?=
BENCH_ARGS    ?=

.PHONY: all setup build demo test test-long lint bench bench-small bench-micro clean distclean

all: build

$(STAMPS)/system: scripts/install-system-packages
	./scripts/install-system-packages
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: $(STAMPS)/system
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_PACKAGES)
	@touch $@

$(STAMPS)/build: $(STAMPS)/venv $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

setup build: $(STAMPS)/build

demo: $(STAMPS)/build
	$(VENV)/bin/dirbackup demo

lint: $(STAMPS)/build
	$(PY) -m ruff check src tests $(wildcard bench)
	$(PY) -m mypy
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cython-lint pyx

test: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-long: $(STAMPS)/build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The side-by-side comparison (full scale, about 10 minutes, several GiB of
# /dev/shm); `make bench-small` checks the suite in a minute; see bench/README.md.
bench: $(STAMPS)/build
	$(PY) bench/compare.py $(BENCH_ARGS)

bench-small: $(STAMPS)/build
	$(PY) bench/compare.py --scale small --no-write $(BENCH_ARGS)

# Micro-benchmarks of the core (pytest-benchmark); not part of `make test`.
bench-micro: $(STAMPS)/build
	$(PY) -m pytest -q -p no:cacheprovider bench/test_micro.py $(PYTEST_ARGS)

clean:
	rm -rf build $(STAMPS)/build
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(STAMPS)
