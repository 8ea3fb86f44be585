# Developer and CI entry points. `make test` is the one command CI runs (.ci/run): it installs
# whatever is missing (Debian server packages, the .venv) and then runs every test.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Root installs directly; anyone else goes through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := mariadb-server mariadb-client redis-server redis-tools postgresql-15 openssl procps
# The binaries the tests run (servers from tests/services.py; openssl makes the TLS test's
# certificates, pgrep checks nothing is left running); any one missing means installing.
SERVER_BINARIES := mariadbd redis-server /usr/lib/postgresql/15/bin/postgres openssl pgrep

.PHONY: install system-packages test unit lint demo bench clean

install: system-packages $(STAMP)

system-packages:
	@missing=""; \
	for bin in $(SERVER_BINARIES); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$$bin" >/dev/null 2>&1 || missing="$$missing $$bin"; \
	done; \
	packages="$(DEB_PACKAGES)"; \
	if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  missing="$$missing python3-venv"; packages="$$packages python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "make install: missing$$missing; installing $$packages"; \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$packages; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependencies may have changed, so repeated `make test` is quick.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $@

test: install
	$(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: install
	$(BIN)/python -m tests.demo $(if $(SOURCE),--source $(SOURCE))

bench: install
	$(BIN)/python -m bench $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo .services build dist *.egg-info .coverage
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
