# Two commands on a fresh machine with Python 3.11 and make:
#   make up     install into .venv, then run the whole stack on embedded defaults
#   make test   install with test tools into .venv, check the dependency rule and import
#               cycles (tools/check_layers.py, docs/architecture.md), lint, type-check,
#               then run the whole test suite
PYTHON ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.8
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)

.PHONY: up install install-dev test lint bench clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# --frozen: exactly the versions in uv.lock; --inexact: keep uv itself in the venv.
install: $(UV)
	$(UV) sync --frozen --inexact --python $(VENV)/bin/python

install-dev: $(UV)
	$(UV) sync --frozen --inexact --extra dev --python $(VENV)/bin/python

up: install
	$(VENV)/bin/nextbest up $(ARGS)

test: install-dev
	$(VENV)/bin/python tools/check_layers.py .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright
	$(VENV)/bin/pytest

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/pyright

clean:
	rm -rf .nextbest .pytest_cache .ruff_cache
