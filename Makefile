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

# `make install-pve`: the Perl plugins of a Proxmox VE node (see README,
# "On a Proxmox VE node"), pointed at this checkout's dirbackup program.
PERL_VENDORLIB ?= $(shell perl -MConfig -e 'print $$Config{vendorlib}')
DIRBACKUP_BIN  ?= $(CURDIR)/$(VENV)/bin/dirbackup
DESTDIR        ?=
PVE_PROVIDER   := PVE/BackupProvider/Plugin/DirBackup.pm
PVE_STORAGE    := PVE/Storage/Custom/DirBackupPlugin.pm

.PHONY: all setup build demo test test-perl test-long lint bench bench-small bench-micro \
	install-pve clean distclean

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

test: lint test-perl
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The Perl plugins, driven as Proxmox VE drives them, with our stand-ins for
# PVE's base classes (perl/t/lib); about 20 s.
test-perl: $(STAMPS)/build
	DIRBACKUP_COMMAND="$(CURDIR)/$(VENV)/bin/dirbackup" prove -r perl/t

install-pve:
	@test -x "$(DIRBACKUP_BIN)" || { echo "error: $(DIRBACKUP_BIN) is not there: run make build first, or give DIRBACKUP_BIN=" >&2; exit 1; }
	install -d $(DESTDIR)$(PERL_VENDORLIB)/$(dir $(PVE_PROVIDER)) \
		$(DESTDIR)$(PERL_VENDORLIB)/$(dir $(PVE_STORAGE))
	sed 's|@DIRBACKUP@|$(DIRBACKUP_BIN)|' perl/$(PVE_PROVIDER) > perl/.DirBackup.pm.tmp
	install -m 0644 perl/.DirBackup.pm.tmp $(DESTDIR)$(PERL_VENDORLIB)/$(PVE_PROVIDER)
	rm -f perl/.DirBackup.pm.tmp
	install -m 0644 perl/$(PVE_STORAGE) $(DESTDIR)$(PERL_VENDORLIB)/$(PVE_STORAGE)
	@echo "installed $(PVE_PROVIDER) and $(PVE_STORAGE) under $(DESTDIR)$(PERL_VENDORLIB)"
	@echo "they run $(DIRBACKUP_BIN) (make install-pve DIRBACKUP_BIN=... to change)"
	@echo "Debian packages they need: perl (JSON::PP, from perl-modules), perl-base (Socket,"
	@echo "  Fcntl, POSIX), libpve-storage-perl 8.4 or later (storage API 11, backup providers),"
	@echo "  and dirbackup's own: qemu-utils, libnbd-bin (nbdfuse, for restores), python3-libnbd"
	@echo "then: systemctl restart pvedaemon pveproxy pvescheduler; see README, On a Proxmox VE node"

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
