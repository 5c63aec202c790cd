# `make check` is what CI runs (.ci/run) and what the README tells you to run.
PYTHON ?= python

.PHONY: check lint test bench

check: lint test

lint:
	$(PYTHON) -m ruff check .

test:
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) scripts/bench_base.py
