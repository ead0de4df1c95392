# Developer tasks. PYTHON is the environment's interpreter (the repository's .venv by default).
# Tests run single-threaded (OMP_NUM_THREADS=1), as the suite expects.
PYTHON ?= .venv/bin/python
# PYTHONSAFEPATH=1: `-m` does not put the repository root on sys.path (see tests/conftest.py).
PYTEST = OMP_NUM_THREADS=1 PYTHONSAFEPATH=1 $(PYTHON) -m pytest -q --show-capture=no

.PHONY: lint format type fast slow package test

lint:  ## ruff's lint and format checks
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## apply ruff's fixes and formatting
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

type:  ## mypy on the package as the wheel lays it out (builds the wheel)
	$(PYTEST) tests/test_static_checks.py -k mypy

fast:  ## every test but the slow and packaging ones
	$(PYTEST) -m "not slow and not packaging"

slow:  ## Inductor end-to-end, multi-process and full demo runs
	$(PYTEST) -m slow

package:  ## build the wheel, install it in a fresh environment, check what it holds and that it runs
	$(PYTEST) -m packaging

test:  ## the whole suite
	$(PYTEST)
