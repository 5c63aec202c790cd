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
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets.common import DataError
from model import CheckpointError, TokenizerNotFound
from train import console
from train.checkpoint import CheckpointCorrupt, DiskFull
from train.cli import build_parser, build_spec, check_inputs
from train.lifecycle import EXIT_DIVERGED, Interrupted, StopSignals, TrainingDiverged
from train.loop import train
from train.run import HELD, RunFolderBusy, RunFolderError, run_folder
from train.runs import saved_checkpoints
from train.runtime import cuda_kernel_settings
from train.settings import MultitaskSettings, from_args, task_weights
from train.spec import RunSpec
from train.tasks import TASKS

# Problems with the user's inputs (paths, files, an existing run folder): one message, no traceback.
USER_ERRORS = (
    CheckpointError,
    CheckpointCorrupt,
    DiskFull,
    DataError,
    TokenizerNotFound,
    RunFolderError,
    RunFolderBusy,
    FileExistsError,
    FileNotFoundError,
)


@dataclass(frozen=True)
class EntryPoint:
    description: str
    add_selection: Callable[[argparse.ArgumentParser, bool], None]  # (parser, required)
    select: Callable[[argparse.Namespace], list[str]]  # task names
    label: Callable[[argparse.Namespace], str]  # run-name prefix
    possible: tuple[str, ...] | None = None  # the tasks it can select (None: every task); --help shows their flags
    settings: Callable[[argparse.Namespace, list[str]], dict] | None = None  # its own settings (multitask)


def _no_selection(parser: argparse.ArgumentParser, required: bool) -> None:
    pass


def fixed_task(name: str, description: str) -> EntryPoint:
    return EntryPoint(description, _no_selection, lambda args: [name], lambda args: name, possible=(name,))


def _add_task(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--task", choices=list(TASKS), required=required, help="the task to train")


def _add_multitask(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("multitask")
    group.add_argument(
        "--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="tasks sharing one backbone (default: all)"
    )
    defaults = MultitaskSettings()
    group.add_argument(
        "--task_sampling",
        choices=["proportional", "uniform", "temperature"],
        default=None,
        help=f"how batches are drawn from the tasks (default: {defaults.task_sampling})",
    )
    group.add_argument(
        "--sampling_temperature",
        type=float,
        default=None,
        help=f"p ∝ n^(1/T) (default: {defaults.sampling_temperature})",
    )
    group.add_argument(
        "--task_weights", nargs="*", default=None, metavar="TASK=WEIGHT", help="loss weight per task (default: 1 each)"
    )


def _select_multitask(args: argparse.Namespace) -> list[str]:
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError("--tasks lists a task twice")
    return list(args.tasks)


def _multitask_settings(args: argparse.Namespace, tasks: list[str]) -> dict:
    weights = task_weights(args.task_weights or [], tasks)
    return {"multitask": from_args(MultitaskSettings, args, task_weights=weights)}


GENERIC = EntryPoint(__doc__, _add_task, lambda args: [args.task], lambda args: args.task)
MULTITASK = EntryPoint(
    __doc__,
    _add_multitask,
    _select_multitask,
    lambda args: "multitask-" + "-".join(args.tasks),
    settings=_multitask_settings,
)


def parse(
    entry: EntryPoint, argv: list[str] | None, inputs: bool = True, checkpoint_source: str | None = None
) -> tuple[RunSpec, list]:
    """(the run's RunSpec, its task classes); exits 2 with one line on any invalid flag. With `inputs`,
    the tokenizer and the task data files are checked too (fetching missing data into the cache folder
    when no --data_dir was given), so nothing that can be checked fails later."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    entry.add_selection(pre, False)
    known, _ = pre.parse_known_args(argv)
    try:
        names = [n for n in entry.select(known) if n is not None]
    except (ValueError, TypeError, AttributeError):
        names = []
    parser = build_parser(entry.description, names or list(entry.possible or TASKS))
    entry.add_selection(parser, True)
    args = parser.parse_args(argv)
    try:
        names = entry.select(args)
        extra = entry.settings(args, names) if entry.settings else {}
    except ValueError as error:
        parser.error(str(error))
    spec = build_spec(parser, args, entry.label(args), names, extra, checkpoint_source, argv=argv)
    if inputs:
        check_inputs(parser, spec)
    return spec, [TASKS[n] for n in names]


def planned_run_dir(entry: EntryPoint, argv: list[str], checkpoint_source: str | None = None) -> Path:
    """The folder a run of these flags writes to, without running it (reads config.json and hashes the
    checkpoint, from `checkpoint_source` instead of --model when given)."""
    spec, _ = parse(entry, argv, inputs=False, checkpoint_source=checkpoint_source)
    return run_folder(spec, migrate=False)


def run(entry: EntryPoint, argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one `error:` line), 3 diverged, 130 / 143 interrupted by
    SIGINT / SIGTERM (a checkpoint was saved: add --resume to continue)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with StopSignals() as signals, stopped_at_once():
        with console.phase("checking the flags and inputs", enabled=os.environ.get("RANK", "0") == "0"):
            spec, _ = parse(entry, argv)
        return execute(spec, signals)


class SecondInterrupt(SystemExit):
    """A second Ctrl-C: stop at once, with one line (no traceback) and exit status 130."""


@contextlib.contextmanager
def stopped_at_once():
    """A second Ctrl-C (StopSignals raises KeyboardInterrupt) ends the command with one line, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        saved = [s for run_dir in HELD for s in saved_checkpoints(run_dir / "checkpoints", "last")]
        kept = (
            f"the last one saved ({saved[-1].name}) is kept (add --resume to continue from it)"
            if saved
            else "none had been saved yet, so --resume starts the run again from step 0"
        )
        print(f"\nstopped at once by a second Ctrl-C, without a new checkpoint; {kept}", file=sys.stderr)
        raise SecondInterrupt(130) from None


def execute(spec: RunSpec, signals: StopSignals, start=None) -> int:
    """Train (exit statuses as `run`); every entry point, transfer included, ends here."""
    try:
        with cuda_kernel_settings():
            train(spec, signals, start)
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
    except OSError as error:
        where = error.filename or "the run folder"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full while writing {where}; free space and --resume", file=sys.stderr)
        elif error.errno in (errno.EISDIR, errno.ENOTDIR):  # a folder where a run file belongs, or the reverse
            kind = "a folder" if error.errno == errno.EISDIR else "not a folder"
            print(f"error: {where} is {kind}, which this run cannot use; move it aside and run again", file=sys.stderr)
        elif error.errno == errno.EROFS:
            print(f"error: {where} is on a read-only file system; pass a writable --out_dir", file=sys.stderr)
        else:
            raise
        return 2
    if signals.received is not None:  # arrived during the last evaluation: the run finished anyway
        print("the run finished before the signal could stop it", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(GENERIC, argv)
