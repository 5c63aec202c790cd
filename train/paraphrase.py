"""Train on Quora paraphrase detection (cloze: the LM's "yes"/"no" logits, or a linear head).

    python -m train.paraphrase --use_kan
"""

import sys

from train.entry import run


def _flags(parser):
    parser.add_argument("--paraphrase_head", choices=["cloze", "linear"], default="cloze")


def main(argv=None) -> int:
    return run(__doc__, _flags, lambda a: ["quora"], lambda a: "quora", argv)


if __name__ == "__main__":
    sys.exit(main())
