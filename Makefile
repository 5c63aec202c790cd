# `make check` is what CI runs (.ci/run) and what the README tells you to run.
PYTHON ?= python
# Two pytest workers (pytest-xdist), one torch thread each: much of the suite's time is end-to-end runs,
# which a second worker overlaps. Runs are called in the test's process (tests.conftest.run_command,
# --launcher inprocess) except where the process itself is tested (signals, SIGKILL, torchrun, SLURM).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PYTEST = OMP_NUM_THREADS=$(if $(filter 0,$(TEST_WORKERS)),$${OMP_NUM_THREADS:-2},1) $(PYTHON) -m pytest -q \
	$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

.PHONY: check lint format test test-fast bench

check: lint test

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test:
	$(PYTEST)

# The inner loop: everything but the end-to-end runs marked @pytest.mark.slow.
test-fast:
	$(PYTEST) -m "not slow"

bench:
	$(PYTHON) scripts/bench_base.py
