"""Train on SST-5 or CFIMDB sentiment.

    python -m train.sentiment --dataset sst --use_lora
    python -m train.sentiment --dataset cfimdb --fine_tune_mode last-linear-layer
"""

import sys

from train.entry import run


def _flags(parser):
    parser.add_argument("--dataset", choices=["sst", "cfimdb"], required=True)


def main(argv=None) -> int:
    return run(__doc__, _flags, lambda a: [a.dataset], lambda a: a.dataset, argv)


if __name__ == "__main__":
    sys.exit(main())
