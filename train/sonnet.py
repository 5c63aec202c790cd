"""Train the LM on Shakespeare's sonnets; evaluate by generating the held-out dev sonnets (chrF).
An alias of `python -m train --task sonnet`.

    python -m train.sonnet --use_graph
"""

import sys

from train.commands import exit_status
from train.entry import fixed_task, run

ENTRY = fixed_task("sonnet", __doc__)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main))
