"""Train the LM on Shakespeare's sonnets; evaluate by generating the held-out dev sonnets (chrF).

    python -m train.sonnet --use_graph
"""

import sys

from train.entry import run


def add_flags(parser):
    pass


def task_names(args):
    return ["sonnet"]


def task_label(args):
    return "sonnet"


def main(argv=None) -> int:
    return run(__doc__, add_flags, task_names, task_label, argv)


if __name__ == "__main__":
    sys.exit(main())
