"""Evaluate a model on one task or all of them: dev metrics + course-format predictions for dev and test.

    python -m train.evaluate --task sst|cfimdb|quora|sonnet|all --model gpt2 --data_dir DIR --out_dir DIR

`--model` is a hub id, a local Hugging Face GPT-2 checkpoint folder, or a run folder written by
training (its best checkpoint: the base model it was trained from, its variants, its trained weights
and task heads). Writes, per task,
`<task>-dev-output.csv` / `<task>-test-output.csv` (sonnets: `sonnet-dev-output.txt` /
`sonnet-test-output.txt`) and `metrics.json` with `dev_acc` + `dev_f1` (classification) or
`dev_chrf` (sonnets), and `predictions` (split -> file name). It scores with each task's own
`evaluate`, the same code training evaluates with. With `--task all` each task gets a
sub-folder and the top-level metrics.json maps task -> its metrics.

A bare language model has no trained sentiment head: that head is freshly initialised (seeded)
and the run says so; its numbers are a pipeline check, not a result. The paraphrase cloze head
and sonnet generation need no new parameters. Test files carry no labels and are never scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import sys
import time
from pathlib import Path

import torch

from model import CheckpointError, TokenizerNotFound, load_tokenizer
from model.files import atomic_write_json
from task_data.common import DataError
from train.base import console
from train.base.settings import TrainingSettings, from_args
from train.cli.parse import ArgumentParser, check_data
from train.run import checkpoint as ckpt
from train.run.trained import check_model_exists, load_model, run_record
from train.tasks import TASKS, get_task, task_index
from train.trainer.distributed import auto_device
from train.trainer.runtime import autocast_for, check_device, cuda_kernel_settings, resolve_precision

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", required=True, choices=[*TASKS, "all"], help="the task to score (all: one sub-folder each)"
    )
    parser.add_argument("--model", default="gpt2", help="hub id, local HF GPT-2 checkpoint folder or run folder")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="task data folder (default: a run folder's own, else $GPT2_DATA_DIR or data/cs224n)",
    )
    parser.add_argument("--out_dir", required=True, help="where the prediction files and metrics.json go")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder (default: a run folder's own, else $GPT2_TOKENIZER or the hub)",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="token cap per example (default: sst/quora 128, cfimdb 512; at most n_positions)",
    )
    parser.add_argument("--dev_limit", type=int, default=None, help="use the first N dev examples (default: all)")
    parser.add_argument("--test_limit", type=int, default=None, help="use the first N test examples (default: all)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of fresh heads and sonnet sampling (default: a run folder's own seed, else 0)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu, as training), cpu, cuda, cuda:1, mps (default: auto)"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="compute precision (default: a run folder's own, the one its dev metrics were computed in, so "
        "the scores match; else auto = bf16 on a CUDA GPU that supports it, fp32 elsewhere)",
    )
    for task in TASKS.values():
        task.add_flags(parser)
    args = parser.parse_args(argv)
    names = list(TASKS) if args.task == "all" else [args.task]
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    try:
        args.settings = TrainingSettings(
            eval_batch_size=args.batch_size,
            max_length=args.max_length,
            dev_limit=args.dev_limit,
            test_limit=args.test_limit,
            train_limit=None,
        )
        args.task_settings = {n: from_args(get_task(n).settings, args) for n in names if get_task(n).settings}
        check_device(args.device)
        args.device = auto_device() if args.device == "auto" else args.device
    except ValueError as error:
        parser.error(str(error))
    try:
        check_model_exists(args.model)
    except ValueError as error:
        parser.error(str(error))
    recorded = run_record(args.model)  # a run folder: its own data and tokenizer folders unless given
    args.tokenizer = args.tokenizer or recorded.get("tokenizer")
    args.data_dir = check_data(parser, names, args.data_dir or recorded.get("data_dir"), args.tokenizer)
    return args


@console.command("python -m train.evaluate")
def main(argv: list[str] | None = None) -> int:
    console.log_to_stderr(logging.INFO)
    args = parse_args(argv)
    try:
        return _evaluate(args)
    except (CheckpointError, ckpt.CheckpointCorrupt, DataError, TokenizerNotFound, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # --out_dir read-only, a full disk, a folder where a file belongs: one line
        if error.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.EACCES):
            raise
        print(f"error: cannot write {error.filename or args.out_dir} ({error.strerror})", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    with console.phase(f"loading {args.model}"):
        model, trained_heads, training = load_model(args.model)
    model = model.to(args.device).eval()
    quora = args.task_settings.get("quora")
    if quora is not None and training.get("paraphrase_head") and training["paraphrase_head"] != quora.paraphrase_head:
        log.warning(
            "the run was trained with --paraphrase_head %s; evaluating with that head", training["paraphrase_head"]
        )
        args.task_settings["quora"] = dataclasses.replace(quora, paraphrase_head=training["paraphrase_head"])
    if args.seed is None:
        args.seed = training.get("seed", 0)
    settings = dataclasses.replace(args.settings, seed=args.seed)
    precision = resolve_precision(args.precision or training.get("resolved_precision", "auto"), args.device)
    log.info("computing in %s on %s", precision, args.device)
    tokenizer = load_tokenizer(args.tokenizer)
    out_dir = Path(args.out_dir)
    names = list(TASKS) if args.task == "all" else [args.task]
    summary = {}
    for name in names:
        folder = out_dir / name if args.task == "all" else out_dir
        folder.mkdir(parents=True, exist_ok=True)
        with console.phase(f"{name}: reading the data"):
            task = get_task(name)(
                tokenizer, args.data_dir, settings, model.config.input_positions, args.task_settings.get(name)
            )
        torch.manual_seed(args.seed)
        head = task.make_head(model)
        if head is not None:
            head = head.to(args.device)
            if name in trained_heads:
                head.load_state_dict(trained_heads[name])  # strict: a head of another shape raises
            elif any(True for _ in head.parameters()):
                log.warning(
                    "%s: the %s head is freshly initialised (no trained head in %s): a pipeline check, not a result",
                    name,
                    type(head).__name__,
                    args.model,
                )
        start = time.perf_counter()
        with cuda_kernel_settings(), autocast_for(args.device, precision):  # as training evaluated
            with model.for_task(task_index(name)):  # variants that route by task (peft's poly)
                metrics = task.evaluate(model, head, folder, args.device)  # the path training evaluates with
                metrics["predictions"].update(task.test_predictions(model, head, folder, args.device))
        metrics["precision"] = precision
        metrics.update(task=name, model=str(args.model), seconds=round(time.perf_counter() - start, 3))
        atomic_write_json(folder / "metrics.json", metrics)
        summary[name] = metrics
        score = {k: round(v, 4) for k, v in metrics.items() if k in ("dev_acc", "dev_f1", "dev_chrf")}
        print(f"{name}: {score} -> {folder}")
    if args.task == "all":
        atomic_write_json(out_dir / "metrics.json", summary)
    return 0
