"""Cross-task transfer: continue a trained run on another task, and score it before and after.

    python -m train.transfer --source_run RUN_DIR --target cfimdb [--target_fraction 0.01] [--epochs 1] [--seed S]
    python -m train.transfer --source_run RUN_DIR --target cfimdb --from_scratch      (the control)

The source run's model (its base checkpoint, its variants and knobs, its trained weights and the
frozen variant state its checkpoint keeps) is the starting point; nothing about the architecture
can be changed here. The run then
1. scores the target's dev set ZERO-SHOT with the source task's trained head, where the two label
   spaces map (LABEL_MAPS). SST-5 -> CFIMDB: p(negative) = p(0) + p(1) + p(2)/2 and
   p(positive) = p(3) + p(4) + p(2)/2 (the neutral class's probability is split evenly). Where no map
   exists (CFIMDB's 2 labels say nothing about SST-5's neutral class or strength), the block says so;
2. continues training the SAME trained weights (the source's fine-tune mode: adapters stay adapters)
   on a seeded, stratified `--target_fraction` of the target's training set (`--train_fraction`;
   every label must be in it, or the run is refused) for `--epochs`, with a fresh, seeded task head
   (the label spaces of different tasks differ), and scores the target's dev set.

`--from_scratch` is the control that answers "does the source help?": the same flags, subset,
epochs and seed, but from the base checkpoint with freshly initialised variants. It is exactly the
plain run `python -m train --task TARGET <the source's variant flags> --train_fraction F ...`, so
its folder is that run's.

Training flags the target run does not set are taken from the source run (INHERITED: lr, batch
size, precision, ...); `--epochs` defaults to 1, `--seed` to the source's seed, `--out_dir` to the
folder holding the source run, `--wandb_group` to the source's group. The run folder is a normal
one (`<source task>-to-<target>-<variants>-lr..-s..-<hash>`; the hash covers the source's
configuration), with metrics.json holding the target dev metrics plus
- `source`: the source run, its task, metric and best value;
- `zero_shot`: the mapped dev metrics before any target training (or why there are none);
- `transfer`: the dev metrics after training on the fraction, with the majority-class accuracy
  beside them (`dev_majority_acc`), the fraction and the number of training examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import STACK_FIELDS
from model.fingerprint import checkpoint_identity
from model.loading import CheckpointError, read_checkpoint_config
from train.base import console
from train.base.settings import OutputSettings, RuntimeSettings, TrainingSettings, given
from train.cli import entry
from train.cli.parse import build_parser, check_inputs, config_fields, hide_flags
from train.run import checkpoint as ckpt
from train.run.folder import read_record, run_folder
from train.run.legacy import legacy_spec, migrate_legacy
from train.run.spec import Checkpoint, RunSpec
from train.run.state import folder_state
from train.run.trained import copy_run_weights
from train.tasks import TASKS, get_task, labelled_tasks, settings_classes, task_index
from train.tasks.classification import classification_metrics
from train.trainer.lifecycle import StopSignals

# (source task, target task) -> (source labels x target labels) matrix M: p_target = softmax(logits) @ M.
LABEL_MAPS: dict[tuple[str, str], list[list[float]]] = {
    # SST-5: 0 very negative, 1 negative, 2 neutral, 3 positive, 4 very positive -> CFIMDB: 0 negative, 1 positive
    ("sst", "cfimdb"): [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]],
}
NO_MAP_REASONS = {
    ("cfimdb", "sst"): "CFIMDB's two labels say nothing about SST-5's neutral class or sentiment strength",
}
# Settings a transfer run takes from its source unless given (how to optimise and where things are;
# not which examples: limits and fractions are the target's own). The checkpoint is the source's too.
INHERITED = {
    TrainingSettings: (
        "lr",
        "batch_size",
        "eval_batch_size",
        "grad_accum",
        "weight_decay",
        "warmup",
        "schedule",
        "max_grad_norm",
        "max_length",
        "no_bucket",
    ),
    RuntimeSettings: ("precision",),
    OutputSettings: ("tokenizer", "data_dir"),  # the source model's tokenizer, and its data folder
}


def map_to_target(source_logits: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """(n, target labels) probabilities: the source head's softmax pushed through the label map."""
    weights = torch.tensor(matrix, dtype=torch.float32)
    if source_logits.shape[-1] != weights.shape[0]:
        raise ValueError(
            f"the source head has {source_logits.shape[-1]} outputs, the label map {weights.shape[0]} rows"
        )
    return source_logits.float().softmax(-1) @ weights


@dataclass
class SourceRun:
    run_dir: Path
    record: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: Path

    @property
    def task(self) -> str:
        return self.record["task"]

    @property
    def seed(self) -> int:
        return self.record["training"]["seed"]

    @property
    def spec(self) -> RunSpec:
        if "spec" not in self.record:  # a folder of an older version, not migrated (planning renames nothing)
            return legacy_spec(self.record, self.run_dir.parent)
        return RunSpec.from_json(self.record["spec"], settings_classes())

    def summary(self) -> dict[str, Any]:
        metric = get_task(self.task).metric
        return {
            "run": self.run_dir.name,
            "run_dir": str(self.run_dir),
            "task": self.task,
            "config_hash": self.record["config_hash"],
            "seed": self.seed,
            "metric": metric,
            "value": self.metrics.get(metric),
            "best_step": self.metrics.get("best_step"),
        }


def read_source(path: Path, migrate: bool = True) -> SourceRun:
    """A finished single-task run folder (one written before RunSpec is migrated first, unless only
    planning); a ValueError says what is wrong with it."""
    record = read_record(path)  # a RunFolderError (a ValueError) names a missing or corrupt config.json
    if migrate and isinstance(record, dict) and "spec" not in record and "identity" in record:
        for old, new in migrate_legacy(path.parent):
            if old.resolve() == path.resolve():
                print(f"note: {path} was written by an older version; renamed to {new.name}", file=sys.stderr)
                path = new
        record = read_record(path)
    if folder_state(path) != "finished":
        raise ValueError(f"--source_run {path}: the run has not finished (no metrics.json); finish it with --resume")
    if record.get("task") not in TASKS:
        raise ValueError(f"--source_run {path}: transfer starts from a single-task run, not {record.get('task')!r}")
    if "spec" not in record and "identity" not in record:
        raise ValueError(f"--source_run {path}: not a run folder of this code (its config.json has no identity)")
    if "spec" not in record and migrate:
        raise ValueError(
            f"--source_run {path}: written by an older version of this code, and its checkpoint "
            f"{record.get('training', {}).get('model')!r} cannot be found to migrate it"
        )
    best = ckpt.checkpoint_folder(path / "checkpoints", "best")
    if best is None:
        raise ValueError(f"--source_run {path}: no best checkpoint")
    return SourceRun(path, record, json.loads((path / "metrics.json").read_text()), best)


class TransferStart:
    """The loop's `start` hook: the source run's weights in, zero-shot before training, blocks after."""

    def __init__(self, source: SourceRun, target: str) -> None:
        self.source, self.target = source, target

    def load(self, model: torch.nn.Module) -> None:
        self.source_heads = copy_run_weights(model, self.source.checkpoint)

    def before_training(self, model, objectives, device, autocast, shard) -> dict[str, Any]:
        objective = objectives[self.target]
        counts = {str(label): 0 for label in range(objective.num_labels)}
        for example in objective.train:
            counts[str(example.label)] += 1
        block: dict[str, Any] = {
            "source": self.source.summary(),
            "train_examples": len(objective.train),
            "train_label_counts": counts,
            "zero_shot": self.zero_shot(model, objective, device, autocast, shard),
        }
        return block

    def zero_shot(self, model, objective, device, autocast, shard) -> dict[str, Any]:
        pair = (self.source.task, self.target)
        if pair not in LABEL_MAPS:
            reason = NO_MAP_REASONS.get(pair, f"no label map from {pair[0]} to {pair[1]}")
            return {"available": False, "reason": reason}
        # The source head is rebuilt off the run's random stream, so the target run draws the same
        # numbers (head init, dropout) as its from-scratch control.
        source_task = get_task(self.source.task)
        with torch.random.fork_rng(devices=[]):
            # a sentiment head is built from class attributes only: no need to read the source's data
            head = source_task.__new__(source_task).make_head(model)
        head.load_state_dict(self.source_heads[self.source.task])
        head = head.to(device)
        was_training = model.training
        model.eval()
        with autocast, model.for_task(task_index(self.source.task)):  # the source's route (peft's poly)
            logits = objective.dev_logits(model, head, device, shard)
        model.train(was_training)
        predictions = map_to_target(logits, LABEL_MAPS[pair]).argmax(-1).tolist()
        metrics = classification_metrics(objective.dev, predictions, objective.num_labels)
        return {"available": True, "label_map": LABEL_MAPS[pair], **metrics}

    def final_blocks(self, record: dict, best: dict) -> dict[str, Any]:
        start = record["start"]
        after = {k: v for k, v in best.get(self.target, {}).items() if k != "predictions"}
        return {
            "source": start["source"],
            "zero_shot": start["zero_shot"],
            "transfer": {
                "target": self.target,
                "train_fraction": record["training"]["train_fraction"],
                "train_examples": start["train_examples"],
                "epochs": record["training"]["epochs"],
                **after,
            },
        }


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags written on the command line."""
    options = {opt: action.dest for action in parser._actions for opt in action.option_strings}
    return {options[word.split("=")[0]] for word in argv if word.split("=")[0] in options}


def parse(argv: list[str] | None, inputs: bool = True) -> tuple[RunSpec, TransferStart | None]:
    """(the transfer run's RunSpec, its TransferStart or None for --from_scratch); exits 2 with one line
    on bad input. The spec is the source run's saved spec with the target, the target's fraction and
    the settings given here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--target", choices=labelled_tasks())
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(__doc__, [known.target] if known.target else [])
    parser.prog = "python -m train.transfer"
    group = parser.add_argument_group("transfer")
    group.add_argument("--source_run", type=Path, required=True, help="a finished single-task run folder")
    group.add_argument("--target", choices=labelled_tasks(), required=True, help="the task to transfer to")
    group.add_argument(
        "--target_fraction",
        type=float,
        default=0.01,
        help="stratified share of the target's training set to train on (default: %(default)s)",
    )
    # the variants come from the source run and --target_fraction replaces --train_fraction: refused
    # below with the reason, and not listed in --help (it lists exactly what transfer accepts)
    hide_flags(parser, {f.name for f in config_fields()} | {"train_fraction"})
    group.add_argument(
        "--from_scratch",
        action="store_true",
        help="the control: the same run from the base checkpoint with fresh variants (default: off)",
    )
    args = parser.parse_args(argv)
    try:
        source = read_source(args.source_run, migrate=inputs)
        origin = source.spec
    except (ValueError, CheckpointError) as error:
        parser.error(str(error))
    written = _given(parser, argv)
    refused = sorted(f"--{f.name}" for f in config_fields() if f.name in written)
    if refused:
        parser.error(
            f"{', '.join(refused)}: the variants and their knobs come from the source run ({source.run_dir}); "
            f"transfer continues its trained weights"
        )
    if "train_fraction" in written:
        parser.error("use --target_fraction (the share of the target's training set)")
    if args.target == source.task:
        parser.error(f"--target {args.target} is the source run's own task; continue it with --resume --extend_epochs")
    target, from_scratch = args.target, args.from_scratch

    def settings(cls, own, **defaults):
        inherited = {name: getattr(own, name) for name in INHERITED.get(cls, ())}
        return cls(**{**inherited, **defaults, **given(cls, args)})

    try:
        training = settings(TrainingSettings, origin.training, epochs=1, seed=origin.seed)
        training = TrainingSettings(**{**training.to_dict(), "train_fraction": args.target_fraction})
        output = settings(
            OutputSettings,
            origin.output,
            out_dir=str(source.run_dir.parent),
            wandb_group=origin.output.wandb_group or source.task,
        )
        runtime = settings(RuntimeSettings, origin.runtime)
        target_settings = get_task(target).settings
        task_settings = {target: settings(target_settings, None)} if target_settings else {}
        config, checkpoint = origin.config, origin.checkpoint
        if args.model is not None:  # the source's base checkpoint elsewhere (a moved folder): the same size only
            moved = read_checkpoint_config(args.model)
            stack = {k: getattr(moved, k) for k in STACK_FIELDS}
            saved_stack = {k: getattr(config, k) for k in STACK_FIELDS}
            if stack != saved_stack:
                raise ValueError(f"--model {args.model} is not the source run's base size: {stack} vs {saved_stack}")
            config = config.replace(name=str(args.model))
            checkpoint = Checkpoint(str(args.model), checkpoint_identity(args.model))
    except (ValueError, CheckpointError) as error:
        parser.error(str(error))
    transfer_from = None
    if not from_scratch:  # the transfer run's identity: which configuration it starts from, and its seed
        transfer_from = {
            "task": source.task,
            "config_hash": source.record["config_hash"],
            "seed": "same" if source.seed == training.seed else source.seed,
        }
    spec = RunSpec(
        label=target if from_scratch else f"{source.task}-to-{target}",
        tasks=(target,),
        config=config,
        checkpoint=checkpoint,
        training=training,
        task_settings=task_settings,
        output=output,
        runtime=runtime,
        transfer_from=transfer_from,
        argv=tuple(argv),
    )
    if inputs:
        check_inputs(parser, spec)
    return spec, (None if from_scratch else TransferStart(source, target))


def planned_run_dir(argv: list[str]) -> Path:
    spec, _ = parse(argv, inputs=False)
    return run_folder(spec, migrate=False)


@console.command("python -m train.transfer")
def main(argv: list[str] | None = None) -> int:
    console.log_to_stderr(logging.WARNING)
    with StopSignals() as signals, entry.stopped_at_once():
        spec, start = parse(argv)
        return entry.execute(spec, signals, start)
