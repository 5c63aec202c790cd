"""`python -m train --task NAME [flags]`: train one task (see train/entry.py)."""

import sys

from train.commands import exit_status
from train.entry import main

if __name__ == "__main__":
    sys.exit(exit_status(main))
