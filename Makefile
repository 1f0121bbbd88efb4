# Quick start: `make demo` and `make test`. Both create .venv and install the package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast lint coverage bench clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[test,demo]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m batchnorm demo

# Every test, after the linter and the format check (ruff, configured in pyproject.toml).
test: lint
	$(PY) -m pytest

# Without the tests that start processes (distributed) or take seconds each (slow).
test-fast: lint
	$(PY) -m pytest -m "not distributed and not slow"

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Branch coverage of every test, worker processes included (see [tool.coverage] in pyproject.toml).
coverage: $(INSTALLED)
	rm -f .coverage .coverage.*
	$(PY) -m coverage run -m pytest -q
	$(PY) -m coverage combine -q
	$(PY) -m coverage report

bench: $(INSTALLED)
	$(PY) -m batchnorm bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
