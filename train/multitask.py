"""Multitask training: one shared backbone (with its variants), one head per task.

    python -m train.multitask --use_lora --use_graph
    python -m train.multitask --tasks sst quora --task_sampling temperature --sampling_temperature 2

Batches are drawn from the tasks by `--task_sampling` (proportional: each task in proportion to its
batches; uniform; temperature: p ∝ n^(1/T)); `--task_weights sst=1 quora=0.5` scales the losses.
Every task is evaluated on dev; the model is selected by the mean of the dev metrics (chrF / 100).
"""

import sys

from train.entry import run

TASKS = ["sst", "cfimdb", "quora", "sonnet"]


def add_flags(parser):
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS)
    parser.add_argument("--task_sampling", choices=["proportional", "uniform", "temperature"],
                        default="proportional")
    parser.add_argument("--sampling_temperature", type=float, default=2.0)
    parser.add_argument("--task_weights", nargs="*", default=[], metavar="TASK=WEIGHT")


def task_names(args):
    weights = {}
    for item in (args.task_weights if isinstance(args.task_weights, list) else []):
        name, _, value = item.partition("=")
        if name not in args.tasks or not value:
            raise SystemExit(f"error: --task_weights expects TASK=WEIGHT for TASK in {args.tasks}, got {item!r}")
        weights[name] = float(value)
    if isinstance(args.task_weights, list):
        args.task_weights = weights
    if len(set(args.tasks)) != len(args.tasks):
        raise SystemExit("error: --tasks lists a task twice")
    return list(args.tasks)


def task_label(args):
    return "multitask-" + "-".join(args.tasks)


def main(argv=None) -> int:
    return run(__doc__, add_flags, task_names, task_label, argv)


if __name__ == "__main__":
    sys.exit(main())
