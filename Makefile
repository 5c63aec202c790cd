# `make check` is what CI runs (.ci/run) and what the README tells you to run.
PYTHON ?= python

.PHONY: check lint format test test-fast bench

check: lint test

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test:
	$(PYTHON) -m pytest -q

# The inner loop: everything but the end-to-end runs marked @pytest.mark.slow.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) scripts/bench_base.py
