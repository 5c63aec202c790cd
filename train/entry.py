"""The one training entry point; `train.sentiment|paraphrase|sonnet|multitask` are thin aliases.

    python -m train --task sst --use_lora
    python -m train --tasks sst quora sonnet --use_graph          (multitask)

An `EntryPoint` says how its command line selects tasks (`--task`, `--dataset`, `--tasks`, or a
fixed task) and how the run is labelled; everything else is shared: the training flags, each
selected task's own flags (from the task registry), the GPT2Config flags (from the variant
registry), validation at the checkpoint's real size before anything loads, and the loop.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets.common import DataError
from model import CheckpointError, TokenizerNotFound
from train.checkpoint import CheckpointCorrupt
from train.cli import build_parser, check_inputs, cuda_kernel_settings, validate
from train.lifecycle import EXIT_DIVERGED, Interrupted, RunFolderError, StopSignals, TrainingDiverged
from train.loop import train
from train.runs import run_name
from train.tasks import TASKS, get_task

# Problems with the user's inputs (paths, files, an existing run folder): one message, no traceback.
USER_ERRORS = (
    CheckpointError,
    CheckpointCorrupt,
    DataError,
    TokenizerNotFound,
    RunFolderError,
    FileExistsError,
    FileNotFoundError,
)


@dataclass(frozen=True)
class EntryPoint:
    description: str
    add_selection: Callable[[argparse.ArgumentParser, bool], None]  # (parser, required)
    select: Callable[[argparse.Namespace], list[str]]  # task names
    label: Callable[[argparse.Namespace], str]  # run-name prefix


def _no_selection(parser: argparse.ArgumentParser, required: bool) -> None:
    pass


def fixed_task(name: str, description: str) -> EntryPoint:
    return EntryPoint(description, _no_selection, lambda args: [name], lambda args: name)


def _add_task(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--task", choices=list(TASKS), required=required, help="the task to train")


def _add_multitask(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("multitask")
    group.add_argument(
        "--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="tasks sharing one backbone (default: all)"
    )
    group.add_argument(
        "--task_sampling",
        choices=["proportional", "uniform", "temperature"],
        default="proportional",
        help="how batches are drawn from the tasks (default: %(default)s)",
    )
    group.add_argument("--sampling_temperature", type=float, default=2.0, help="p ∝ n^(1/T) (default: %(default)s)")
    group.add_argument(
        "--task_weights", nargs="*", default=[], metavar="TASK=WEIGHT", help="loss weight per task (default: 1 each)"
    )


def _select_multitask(args: argparse.Namespace) -> list[str]:
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError("--tasks lists a task twice")
    if args.sampling_temperature <= 0:
        raise ValueError("--sampling_temperature must be > 0")
    if isinstance(args.task_weights, list):
        weights = {}
        for item in args.task_weights:
            name, _, value = item.partition("=")
            try:
                weights[name] = float(value)
            except ValueError:
                name = ""
            if name not in args.tasks or weights.get(name, -1) < 0:
                raise ValueError(
                    f"--task_weights expects TASK=WEIGHT (weight >= 0) for TASK in {args.tasks}, got {item!r}"
                )
        args.task_weights = weights
    return list(args.tasks)


GENERIC = EntryPoint(__doc__, _add_task, lambda args: [args.task], lambda args: args.task)
MULTITASK = EntryPoint(__doc__, _add_multitask, _select_multitask, lambda args: "multitask-" + "-".join(args.tasks))


def parse(entry: EntryPoint, argv: list[str] | None, inputs: bool = True, config_source: str | None = None):
    """(args, task classes, resolved GPT2Config); exits 2 with one line on any invalid flag. With
    `inputs`, the tokenizer and the task data files are checked too (fetching missing data into the
    cache folder when no --data_dir was given), so nothing that can be checked fails later."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    entry.add_selection(pre, False)
    known, _ = pre.parse_known_args(argv)
    try:
        names = entry.select(known)
        names = [n for n in names if n is not None] or list(TASKS)
    except (ValueError, TypeError, AttributeError):
        names = list(TASKS)  # the full parser below reports the problem
    parser = build_parser(entry.description)
    entry.add_selection(parser, True)
    for name in dict.fromkeys(names):
        get_task(name).add_flags(parser)
    args = parser.parse_args(argv)
    try:
        tasks = [get_task(n) for n in entry.select(args)]
    except ValueError as error:
        parser.error(str(error))
    config = validate(parser, args, tasks, config_source)
    if inputs:
        check_inputs(parser, args, tasks)
    args.argv = argv  # recorded in the run's config.json (not part of its identity)
    return args, tasks, config


def planned_run_dir(entry: EntryPoint, argv: list[str], config_source: str | None = None) -> Path:
    """The folder a run of these flags writes to, without running it (reads config.json only, from
    `config_source` instead of --model when given: a checkpoint not written yet)."""
    args, _, config = parse(entry, argv, inputs=False, config_source=config_source)
    return Path(args.out_dir) / run_name(entry.label(args), config, args)


def run(entry: EntryPoint, argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one `error:` line), 3 diverged, 130 / 143 interrupted by
    SIGINT / SIGTERM (a checkpoint was saved: add --resume to continue)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with StopSignals() as signals:
        args, tasks, config = parse(entry, argv)
        return execute(entry.label(args), tasks, args, config, signals)


def execute(label: str, tasks: list, args, config, signals: StopSignals, start=None) -> int:
    """Train (exit statuses as `run`); every entry point, transfer included, ends here."""
    try:
        with cuda_kernel_settings():
            train(label, tasks, args, config, signals, start)
    except TrainingDiverged as error:
        if str(error):  # empty on torchrun ranks other than 0: one report per run
            print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as error:
        if str(error):
            print(str(error), file=sys.stderr)
        return error.exit_status
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if signals.received is not None:  # arrived during the last evaluation: the run finished anyway
        print("the run finished before the signal could stop it", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(GENERIC, argv)
