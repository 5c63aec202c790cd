"""Train on Quora paraphrase detection (an alias of `python -m train --task quora`): the cloze
head reads the LM's "yes"/"no" logits; `--paraphrase_head linear` trains a linear head instead.

    python -m train.paraphrase --use_kan
"""

import sys

from train.cli.entry import fixed_task, run
from train.cli.exits import exit_status

ENTRY = fixed_task("quora", __doc__)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main))
