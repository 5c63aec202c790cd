"""Train on SST-5 or CFIMDB sentiment.

    python -m train.sentiment --dataset sst --use_lora
    python -m train.sentiment --dataset cfimdb --fine_tune_mode last-linear-layer
"""

import sys

from train.entry import run


def add_flags(parser):
    parser.add_argument("--dataset", choices=["sst", "cfimdb"], required=True)


def task_names(args):
    return [args.dataset]


def task_label(args):
    return args.dataset


def main(argv=None) -> int:
    return run(__doc__, add_flags, task_names, task_label, argv)


if __name__ == "__main__":
    sys.exit(main())
