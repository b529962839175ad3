# derecho-py: `make demo` and `make test` work from a fresh clone with only Python, gcc and apt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP  := $(VENV)/.setup-stamp
# Everything whose change needs a re-install.
SETUP_INPUTS := pyproject.toml $(wildcard plugins/*/pyproject.toml) plugins/transport_verbs/derecho_transport_verbs/_build_ffi.py

.PHONY: setup system-packages test test-long demo bench lint docs clean help

help:
	@echo "make demo       set up, then run a local multi-node group"
	@echo "make test       set up, then run the whole test suite (what CI runs)"
	@echo "make test-long  longer simulator and chaos sweeps"
	@echo "make bench      benchmarks with same-run baselines (derecho bench NAME for one)"
	@echo "make lint       ruff and mypy (make typecheck: mypy alone)"
	@echo "make docs       the documentation site (mkdocs) into site/"
	@echo "make dist       wheels and sdists of all six distributions into dist/"
	@echo "make version V=x.y.z   set the version of every distribution"

setup: $(STAMP)

$(STAMP): $(wildcard $(SETUP_INPUTS))
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip 'setuptools>=77' wheel cffi
	$(PIP) install --quiet -e '.[test,docs,bench]'  # bench: the benchmark smoke tests run in make test too
	@for p in $(PLUGINS); do echo "installing $$p (editable)"; $(PIP) install --quiet --no-build-isolation -e $$p || exit 1; done
	@touch $(STAMP)

# libfabric-dev builds the verbs plugin's cffi module; libfabric-bin gives fi_pingpong for benchmarks.
system-packages:
	@if dpkg -s libfabric-dev libfabric-bin >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing libfabric-dev libfabric-bin with apt-get"; \
		(apt-get install -y -q libfabric-dev libfabric-bin >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q libfabric-dev libfabric-bin >/dev/null)) || \
		 { echo "apt-get could not install libfabric-dev"; exit 1; }; \
	else \
		echo "NOTE: libfabric-dev is not installed and this is not root. Install it with:"; \
		echo "      sudo apt-get install libfabric-dev libfabric-bin"; \
		echo "      (the verbs transport plugin is skipped until then)"; \
	fi

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-long: setup
	$(PY) -m pytest -q -p no:cacheprovider --run-slow

demo: setup
	$(VENV)/bin/derecho plugins
	$(VENV)/bin/derecho demo simple_replicated_objects

bench: setup
	$(PIP) install --quiet -e '.[bench]'
	$(VENV)/bin/derecho bench all

lint: setup typecheck
	$(VENV)/bin/ruff check derecho_core plugins examples tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

.PHONY: typecheck
# mypy --strict on the modules listed in pyproject.toml [tool.mypy] (run by make lint).
typecheck: setup
	$(VENV)/bin/mypy
	@# the guide's example programs import each other as scripts: checked from their own folder
	cd derecho_core/examples && MYPYPATH=.:../..:../../plugins/allocators $(abspath $(VENV))/bin/mypy --strict \
		--follow-imports=silent --explicit-package-bases --cache-dir $(abspath $(VENV))/.mypy_cache_examples *.py

.PHONY: dist version
# Wheel and sdist of each of the six distributions into dist/ (python -m build, isolated;
# BUILD_FLAGS=--no-isolation builds with the setuptools/cffi of .venv instead, offline).
DISTS := . $(patsubst %/,%,$(PLUGINS))
dist: setup
	$(PY) scripts/versions.py check
	rm -rf dist
	@for d in $(DISTS); do echo "building $$d"; $(PY) -m build $(BUILD_FLAGS) --outdir dist $$d >/dev/null || exit 1; done
	@ls dist

# One version for all six distributions: make version V=0.2.0 (see scripts/versions.py).
version:
	@test -n "$(V)" || { echo "usage: make version V=x.y.z"; exit 2; }
	$(PYTHON) scripts/versions.py set $(V)

# The docs site (mkdocs.yml, material theme) into site/; the configuration and CLI references are
# generated from the code during the build (docs/gen_reference.py).
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site
