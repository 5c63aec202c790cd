"""Shared plumbing of the thin entry points: parse, validate, build objectives, run the loop."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from datasets.common import DataError, data_dir
from model import CheckpointError, TokenizerNotFound
from train.cli import build_parser, validate
from train.loop import TrainingDiverged, train
from train.objectives import ClassificationObjective, DataLimits, SonnetObjective
from train.tasks import GenerationSettings

# Problems with the user's inputs (paths, files, an existing run folder): one message, no traceback.
USER_ERRORS = (CheckpointError, DataError, TokenizerNotFound, FileExistsError, FileNotFoundError)


def objective(name: str, args: argparse.Namespace, tokenizer, config):
    limits = DataLimits(args.train_limit, args.dev_limit, args.test_limit)
    max_length = min(args.max_length, config.n_positions)
    if name == "sonnet":
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        return SonnetObjective(tokenizer, data_dir(args.data_dir), limits, max_length, settings)
    return ClassificationObjective(name, tokenizer, data_dir(args.data_dir), limits, max_length,
                                   getattr(args, "paraphrase_head", "cloze"))


def planned_run_dir(module: str, argv: list[str]) -> Path:
    """The folder a run of `python -m <module> <argv>` will write to, without running it."""
    from train.runs import run_name

    entry_module = importlib.import_module(module)
    parser = build_parser("")
    entry_module.add_flags(parser)
    args = parser.parse_args(argv)
    config = validate(parser, args)
    entry_module.task_names(args)  # validates task-specific flags
    return Path(args.out_dir) / run_name(entry_module.task_label(args), config, args.lr, args.seed)


def run(description: str, add_flags: Callable[[argparse.ArgumentParser], None],
        tasks: Callable[[argparse.Namespace], list[str]], label: Callable[[argparse.Namespace], str],
        argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser(description)
    add_flags(parser)
    args = parser.parse_args(argv)
    validate(parser, args)
    names = tasks(args)

    def make(tokenizer, config):
        return {name: objective(name, args, tokenizer, config) for name in names}

    try:
        train(label(args), make, args)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
