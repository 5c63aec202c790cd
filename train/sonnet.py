"""Train the LM on Shakespeare's sonnets; evaluate by generating the held-out dev sonnets (chrF).

    python -m train.sonnet --use_graph
"""

import sys

from train.entry import run


def main(argv=None) -> int:
    return run(__doc__, lambda parser: None, lambda a: ["sonnet"], lambda a: "sonnet", argv)


if __name__ == "__main__":
    sys.exit(main())
