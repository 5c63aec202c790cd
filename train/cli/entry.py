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

from model import CheckpointError, TokenizerNotFound
from task_data.common import DataError
from train.base import console
from train.base.settings import MultitaskSettings, from_args, task_weights
from train.cli.parse import ArgumentParser, build_parser, build_spec, check_inputs, raising_errors
from train.run.checkpoint import CheckpointCorrupt, DiskFull
from train.run.folder import HELD, run_folder
from train.run.lock import RunFolderBusy
from train.run.spec import RunSpec
from train.run.state import RunFolderError, saved_checkpoints
from train.tasks import TASKS
from train.trainer.lifecycle import BadInput, RunStopped, StopSignals, TrainingDiverged
from train.trainer.loop import train
from train.trainer.runtime import cuda_kernel_settings

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
    pre = ArgumentParser(add_help=False)
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


@console.command("python -m train")
def run(entry: EntryPoint, argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one `error:` line), 3 diverged, 130 / 143 interrupted by
    SIGINT / SIGTERM (a checkpoint was saved: add --resume to continue)."""
    console.log_to_stderr(logging.WARNING)
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


def spec_from_argv(argv: list[str]) -> RunSpec:
    """The RunSpec of a `python -m train` command line (`--tasks A B` for multitask), parsed and
    validated exactly as the command line does (tokenizer and data checked, missing data fetched);
    BadInput, with the message the command line would print, instead of exit status 2."""
    entry = MULTITASK if "--tasks" in argv or any(word.startswith("--tasks=") for word in argv) else GENERIC
    with raising_errors():
        spec, _ = parse(entry, list(argv))
    return spec


def fit(spec: RunSpec, start=None, signals: StopSignals | None = None) -> dict:
    """Train `spec`: the same run folder, lock, record, resume and extension rules as the command line;
    returns the run's final metrics (its metrics.json). Raises, instead of exiting:
    BadInput (exit 2: a checkpoint, data file, run folder or disk the run cannot use), TrainingDiverged
    (exit 3), Interrupted (130 / 143: SIGINT / SIGTERM, a checkpoint saved). `signals`: a StopSignals
    the caller entered (default: one entered here, which catches SIGINT / SIGTERM in the main thread).
    `start`: a run that begins from another run's weights (train/cli/transfer.py)."""
    with contextlib.ExitStack() as stack:
        if signals is None:
            signals = stack.enter_context(StopSignals())
        try:
            with cuda_kernel_settings():
                return train(spec, signals, start)
        except USER_ERRORS as error:
            raise BadInput(str(error)) from error
        except OSError as error:
            message = os_error_message(error)
            if message is None:
                raise
            raise BadInput(message) from error


def os_error_message(error: OSError) -> str | None:
    """One line for the OS errors a user can fix (a full disk, a folder where a run file belongs, a
    read-only file system); None for any other (a bug: its traceback is wanted)."""
    where = error.filename or "the run folder"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {where}; free space and --resume"
    if error.errno in (errno.EISDIR, errno.ENOTDIR):  # a folder where a run file belongs, or the reverse
        kind = "a folder" if error.errno == errno.EISDIR else "not a folder"
        return f"{where} is {kind}, which this run cannot use; move it aside and run again"
    if error.errno == errno.EROFS:
        return f"{where} is on a read-only file system; pass a writable --out_dir"
    return None


def execute(spec: RunSpec, signals: StopSignals, start=None) -> int:
    """`fit`, its typed errors turned into exit statuses and one line each; every entry point, transfer
    included, ends here."""
    try:
        fit(spec, start, signals)
    except RunStopped as error:
        if str(error):  # empty on torchrun ranks other than 0: one report per run
            print(f"error: {error}" if isinstance(error, BadInput | TrainingDiverged) else str(error), file=sys.stderr)
        return error.exit_status
    if signals.received is not None:  # arrived during the last evaluation: the run finished anyway
        print("the run finished before the signal could stop it", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(GENERIC, argv)
