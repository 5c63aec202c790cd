"""Multitask training: one shared backbone (with its variants), one head per task.

    python -m train.multitask --use_lora --use_graph
    python -m train.multitask --tasks sst quora --task_sampling temperature --sampling_temperature 2

Batches are drawn from the tasks by `--task_sampling` (proportional: each task in proportion to its
batches; uniform; temperature: p ∝ n^(1/T)); `--task_weights sst=1 quora=0.5` scales the losses.
Every task is evaluated on dev; the model is selected by the mean of the tasks' selection scores
(accuracy; chrF / 100).
"""

import dataclasses
import sys

from train.cli.entry import MULTITASK, run
from train.cli.exits import exit_status

ENTRY = dataclasses.replace(MULTITASK, description=__doc__)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main))
