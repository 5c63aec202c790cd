"""The table of supported and refused peft methods (docs/peft-methods.md), and the `methods` presets (the logic lives
in experiments/methods.py; tests check that both are what it generates).

    python scripts/peft_methods.py            # the table of supported and refused methods (docs/peft-methods.md)
    python scripts/peft_methods.py --write    # (re)write experiments/presets/methods.toml and methods_smoke.toml
"""

import sys

from experiments.methods import main
from train.cli.exits import exit_status

if __name__ == "__main__":
    sys.exit(exit_status(main))
