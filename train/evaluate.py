"""Evaluate a model (a hub id, a checkpoint folder or a run folder) on one task or all of them:
dev metrics and course-format predictions for dev and test.
The command `python -m train.evaluate`; the work is train/cli/evaluate.py's (its docstring gives the flags).
"""

import sys

from train.cli.evaluate import main
from train.cli.exits import exit_status

if __name__ == "__main__":
    sys.exit(exit_status(main))
