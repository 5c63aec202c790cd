"""Train on Quora paraphrase detection (cloze: the LM's "yes"/"no" logits, or a linear head).

    python -m train.paraphrase --use_kan
"""

import sys

from train.entry import run


def add_flags(parser):
    parser.add_argument("--paraphrase_head", choices=["cloze", "linear"], default="cloze")


def task_names(args):
    return ["quora"]


def task_label(args):
    return "quora"


def main(argv=None) -> int:
    return run(__doc__, add_flags, task_names, task_label, argv)


if __name__ == "__main__":
    sys.exit(main())
