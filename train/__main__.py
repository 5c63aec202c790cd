"""`python -m train --task NAME [flags]`: train one task (see train/cli/entry.py)."""

import sys

from train.cli.entry import main
from train.cli.exits import exit_status

if __name__ == "__main__":
    sys.exit(exit_status(main))
