# Two commands, both as root on a fresh Debian 12 machine:
#   make run    install everything, then serve the portal on its embedded defaults
#   make test   install everything, then run the whole test suite (unit, integration, browser)
# Then, for the edit-test loop (no root, no daemons, no installs):
#   make unit   the unit layer alone (pytest -m "not integration and not browser")
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: run test unit host host-test deps deps-test assets prepare lint bench clean

run: host deps assets prepare
	$(PY) manage.py bootstrap
	exec $(PY) manage.py serve

# The whole suite on the embedded SQLite and Huey's SQLite queue: the unit layer spread over the CPUs (it
# shares no daemon), then the real-stack layers (integration, browser) in one process, for they share the
# host's libvirtd, the session's worker and its guests; then the tests marked `engines` (quota races,
# parallel creates, console and BMC services) again on a private PostgreSQL and Redis with two consumers.
test: host-test deps-test assets
	$(PY) -m pytest -m "not integration and not browser" -n $(UNIT_JOBS) $(PYTEST_ARGS)
	$(PY) -m pytest -m "(integration or browser) and not engines_only" $(PYTEST_ARGS)
	scripts/engines.sh $(PY) -m pytest -m "engines or engines_only" $(PYTEST_ARGS)

# Uses the .venv and node_modules that `make test` left; installs nothing and needs no daemon. Spread over
# the CPUs by pytest-xdist (UNIT_JOBS=0: in one process).
UNIT_JOBS ?= auto
unit:
	@test -f $(VENV)/.deps-test || { echo "make unit: run 'make test' (or 'make deps-test assets') once first" >&2; exit 1; }
	@test $(VENV)/.deps-test -nt requirements-dev.txt || { echo "make unit: run 'make deps-test' first" \
		"(no root needed): requirements-dev.txt changed since .venv was made" >&2; exit 1; }
	$(PY) -m pytest -m "not integration and not browser" -n $(UNIT_JOBS) $(PYTEST_ARGS)

host:
	scripts/setup-host.sh

host-test:
	scripts/setup-host.sh --test

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(VENV)/bin/python
	$(PIP) install -r requirements.txt 2> >(grep -v 'is ignored: it is neither' >&2)
	touch $@

$(VENV)/.deps-test: requirements.txt requirements-dev.txt $(VENV)/.deps
	$(PIP) install -r requirements-dev.txt 2> >(grep -v 'is ignored: it is neither' >&2)
	touch $@

deps: $(VENV)/.deps
deps-test: $(VENV)/.deps-test

node_modules/.installed: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

assets: node_modules/.installed

prepare:
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py collectstatic --noinput -v0

lint: host-test deps-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

bench: host deps-test assets
	$(PY) bench/bench_sync.py
	$(PY) bench/provision.py
	$(PY) bench/console.py
	$(PY) bench/list_queries.py
	$(PY) bench/fleet.py
	$(PY) bench/metrics.py

clean:
	rm -rf $(VENV) node_modules var
