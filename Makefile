# Quick start: `make demo` and `make test`. Both create .venv and install the package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[test,demo]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m batchnorm demo

test: $(INSTALLED)
	$(PY) -m pytest

# Without the tests that start processes (distributed) or take seconds each (slow).
test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not distributed and not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
