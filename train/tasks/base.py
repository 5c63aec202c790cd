"""The task contract: a task is one file that registers itself (data + head + loss + metric).

A `Task` subclass says, in one place:
* `name`, `metric` (the dev metric it reports, e.g. `dev_acc`) and how that metric becomes a
  selection score in [0, 1] (`selection_score`, used to pick the best checkpoint and, averaged, in
  multitask);
* `data_files()`: the release files it reads (checked, or fetched, before anything loads);
* `add_flags(parser)`: its own command-line flags (e.g. Quora's `--paraphrase_head`, the sonnet
  generation settings), and `check_flags(args)` for their values (before anything is loaded);
* construction from (tokenizer, data folder, parsed flags, the model's context length): it reads
  its files (the training split lazily);
* `make_head(model)`, `batches(...)`, `loss(...)`, `batch_tokens(...)` for training;
* `evaluate(...)`: dev metrics plus its course-format prediction files for dev and test. The
  training loop and `python -m train.evaluate` both call this: one evaluation path.

Flags every task reads from the parsed arguments: `train_limit`, `dev_limit`, `test_limit`
(None = all), `max_length`, `seed`, and `eval_batch_size`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

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

    def __init__(self, tokenizer: Any, data_dir: Path, args: argparse.Namespace, n_positions: int) -> None:
        """`n_positions`: the model's context length, which caps every encoded example."""
        self.tokenizer, self.data_dir, self.args, self.n_positions = tokenizer, Path(data_dir), args, n_positions

    @classmethod
    def data_files(cls) -> list[str]:
        """The release files the task reads (checked, and fetched when missing, before anything loads)."""
        raise NotImplementedError

    # ---- flags ----
    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """Task-specific flags (none by default)."""

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> None:
        """Raise ValueError naming the flag when a value is invalid (before anything loads)."""

    # ---- training ----
    def make_head(self, model: nn.Module) -> nn.Module | None:
        raise NotImplementedError

    def batches(self, epoch: int, batch_size: int, seed: int, bucket: bool = True) -> list[list[int]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, head: nn.Module | None, batch: list[int], device: str) -> torch.Tensor:
        raise NotImplementedError

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
        raise NotImplementedError

    @classmethod
    def selection_score(cls, metrics: dict[str, Any]) -> float:
        return metrics[cls.metric] / cls.metric_scale


def selection_score(metrics_by_task: dict[str, dict]) -> float:
    """Mean of the tasks' selection scores (one task: its own)."""
    values = [get_task(name).selection_score(metrics) for name, metrics in metrics_by_task.items()]
    return sum(values) / len(values)
