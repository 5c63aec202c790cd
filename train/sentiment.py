"""Train on SST-5 or CFIMDB sentiment (an alias of `python -m train --task sst|cfimdb`).

python -m train.sentiment --dataset sst --use_lora
python -m train.sentiment --dataset cfimdb --fine_tune_mode last-linear-layer
"""

import sys

from train.cli.entry import EntryPoint, run
from train.cli.exits import exit_status


def _add_dataset(parser, required):
    parser.add_argument("--dataset", choices=["sst", "cfimdb"], required=required, help="which sentiment task")


ENTRY = EntryPoint(
    __doc__, _add_dataset, lambda args: [args.dataset], lambda args: args.dataset, possible=("sst", "cfimdb")
)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main))
