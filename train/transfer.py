"""Cross-task transfer: continue a trained run on another task, and score it before and after.
The command `python -m train.transfer`; the work is train/cli/transfer.py's (its docstring gives the flags).
"""

import sys

from train.cli.exits import exit_status
from train.cli.transfer import main

if __name__ == "__main__":
    sys.exit(exit_status(main))
