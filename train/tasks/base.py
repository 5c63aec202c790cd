"""The task contract: a task is one file that registers itself (data + head + loss + metric).

A `Task` subclass says, in one place:
* `name`, `metric` (the dev metric it reports, e.g. `dev_acc`) and how that metric becomes a
  selection score in [0, 1] (`selection_score`, used to pick the best checkpoint and, averaged, in
  multitask);
* `data_files()`: the release files it reads (checked, or fetched, before anything loads);
* `settings`: the typed settings of its own flags (e.g. Quora's `--paraphrase_head`, the sonnet
  generation settings; train/base/settings.py machinery: flags, defaults, bounds and checks in one place);
* construction from (tokenizer, data folder, training settings, the model's context length, its own
  settings): it reads its files (the training split lazily);
* `make_head(model)`, `batches(...)`, `loss(...)`, `batch_tokens(...)` for training;
* `evaluate(...)`: dev metrics plus the course-format dev prediction file; `test_predictions(...)`:
  the test prediction file (only when `predict_test`: otherwise the test file is never opened). The
  training loop evaluates dev at every evaluation and predicts test once, at the end, from the best
  checkpoint; `python -m train.evaluate` calls both: one evaluation path.

Training settings every task reads: `train_limit`, `dev_limit`, `test_limit` (None = all),
`max_length`, `seed`, and `eval_batch_size`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from train.base.settings import CommandSettings, TrainingSettings, add_flags

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the registry under `cls.name`."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def labelled_tasks() -> list[str]:
    """The tasks whose examples carry a class label (the classification tasks)."""
    return [name for name, task in TASKS.items() if getattr(task, "num_labels", None) is not None]


def settings_classes() -> dict[str, type]:
    """Each task's own settings class by task name, plus the multitask mixture's (RunSpec.from_json)."""
    from train.base.settings import MultitaskSettings

    classes = {name: task.settings for name, task in TASKS.items() if task.settings is not None}
    return {**classes, "multitask": MultitaskSettings}


def task_index(name: str) -> int:
    """The task's fixed position in the registry: its id for variants that route by task (peft's poly),
    the same in every run and every command."""
    return list(TASKS).index(name)


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def sharded(items: list, shard: tuple[int, int], compute) -> list:
    """Run `compute` on this rank's share (items[rank::world]) and gather every rank's results back
    into the original order; with one process it is just `compute(items)`."""
    rank, world = shard
    if world == 1:
        return compute(items)
    mine = items[rank::world]
    parts: list = [None] * world
    dist.all_gather_object(parts, compute(mine) if mine else [])
    results: list = [None] * len(items)
    for r, part in enumerate(parts):
        results[r::world] = part
    return results


def limit(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


class Task:
    name: ClassVar[str]
    metric: ClassVar[str]  # the dev metric in `evaluate`'s result that ranks checkpoints
    metric_scale: ClassVar[float] = 1.0  # selection score = metric / scale (chrF: 100)
    settings: ClassVar[type[CommandSettings] | None] = None  # the task's own flags, if any

    def __init__(
        self,
        tokenizer: Any,
        data_dir: Path,
        training: TrainingSettings,
        n_positions: int,
        options: CommandSettings | None = None,
        captured: Callable | None = None,
        predict_test: bool = True,
    ) -> None:
        """`n_positions`: the positions an input may fill (the context length less any virtual tokens),
        which caps every encoded example. `options`: the task's own settings (its defaults when None).
        `captured`: `(model, head, device, token ids) -> a captured forward or None`, evaluation through
        CUDA graphs, which the training loop gives under `--fast_step on` (train/trainer/graphs.py's
        EvaluationGraphs; the task knows nothing of graphs); None: evaluation runs eagerly.
        `predict_test=False`: the test split is never read (a learning-rate tuning run scores dev only)."""
        self.tokenizer, self.data_dir, self.n_positions = tokenizer, Path(data_dir), n_positions
        self.training, self.predict_test = training, predict_test
        if options is None and self.settings is not None:
            options = self.settings()
        self.options, self.captured = options, captured

    @classmethod
    def data_files(cls) -> list[str]:
        """The release files the task reads (checked, and fetched when missing, before anything loads)."""
        raise NotImplementedError

    @classmethod
    def check_files(cls, data_dir: Path) -> None:
        """Checks across the task's files (DataError naming the file), run before anything loads, so a
        problem that would surface only at the first evaluation stops the run at once. None by default."""

    # ---- flags ----
    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """The task's own flags, generated from `settings` (none by default)."""
        if cls.settings is not None:
            add_flags(parser, cls.settings)

    # ---- training ----
    def make_head(self, model: nn.Module) -> nn.Module | None:
        raise NotImplementedError

    def batches(self, epoch: int, batch_size: int, seed: int, bucket: bool = True) -> list[list[int]]:
        raise NotImplementedError

    def inputs(self, batch: list[int], rows: int | None = None) -> dict[str, torch.Tensor]:
        """The batch as CPU tensors, right-padded. `rows` (static shapes, the fast step): the length
        pads to a bucket (task_data.batching.bucket_length) and the batch to `rows` rows, the extra
        rows all padding and ignored by the loss, so an epoch sees a bounded set of shapes."""
        raise NotImplementedError

    def loss_on(self, model: nn.Module, head: nn.Module | None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss from `inputs` already on the model's device. No host sync: the ids were
        checked once (`check_token_ids`), the batch is right-padded (see GPT2Model.forward)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, head: nn.Module | None, batch: list[int], device: str) -> torch.Tensor:
        inputs = {key: value.to(device) for key, value in self.inputs(batch).items()}
        return self.loss_on(model, head, inputs)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError when a training token id is outside the model's vocabulary (checked once
        here, on the host, so the training step itself never needs to)."""
        highest = max((max(ids) for ids in self.encoded.ids), default=0)
        if highest >= vocab_size:
            raise ValueError(
                f"{self.name}: the training data has token id {highest}, outside the model's vocabulary "
                f"[0, {vocab_size}); use the model's own tokenizer"
            )

    def batch_tokens(self, batch: list[int]) -> int:
        raise NotImplementedError

    def check_training_data(self) -> None:
        """Read and validate the training split (the loop calls it before any weight loads)."""

    # ---- evaluation (training and `train.evaluate` share it) ----
    def evaluate(
        self,
        model: nn.Module,
        head: nn.Module | None,
        out_dir: Path | None,
        device: str,
        with_train: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, Any]:
        """Dev metrics (every rank scores its share; gathered); the rank given an `out_dir` writes the dev
        prediction file there and names it in `metrics["predictions"]`."""
        raise NotImplementedError

    def test_predictions(
        self,
        model: nn.Module,
        head: nn.Module | None,
        out_dir: Path | None,
        device: str,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, str]:
        """Predict the test split (every rank its share); the rank given an `out_dir` writes the file and
        gets {"test": file name}. {} when the run predicts no test split (`predict_test=False`)."""
        raise NotImplementedError

    @classmethod
    def selection_score(cls, metrics: dict[str, Any]) -> float:
        return metrics[cls.metric] / cls.metric_scale


def selection_score(metrics_by_task: dict[str, dict]) -> float:
    """Mean of the tasks' selection scores (one task: its own)."""
    values = [get_task(name).selection_score(metrics) for name, metrics in metrics_by_task.items()]
    return sum(values) / len(values)
