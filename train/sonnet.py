"""Train the LM on Shakespeare's sonnets; evaluate by generating the held-out dev sonnets (chrF).
An alias of `python -m train --task sonnet`.

    python -m train.sonnet --use_graph
"""

import sys

from train.cli.entry import fixed_task, run
from train.cli.exits import exit_status

ENTRY = fixed_task("sonnet", __doc__)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main))
