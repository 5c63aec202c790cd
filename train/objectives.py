"""Training objectives: a task = data + head + loss + metric, shared by every entry point.

`ClassificationObjective` (sst, cfimdb, quora) trains its head (and whatever fine_tune_mode lets
train) with cross-entropy on the last real token; `SonnetObjective` trains the LM on the sonnets
with padding ignored. Each `evaluate` scores dev and writes course-format predictions for dev and
test. Batches are lists of example indices, drawn deterministically from (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datasets.batching import collate, encode, make_batches
from datasets.sonnets import load_sonnets
from train.predictions import write_classification, write_sonnets
from train.tasks import (
    CLASSIFICATION_TASKS,
    ClassificationTask,
    GenerationSettings,
    classification_metrics,
    generate_sonnets,
    predict,
    sonnet_chrf,
)


def sharded(items: list, shard: tuple[int, int], compute) -> list:
    """Run `compute` on this rank's share (items[rank::world]) and gather every rank's results back
    into the original order; with one process it is just `compute(items)`."""
    rank, world = shard
    if world == 1:
        return compute(items)
    import torch.distributed as dist

    mine = items[rank::world]
    parts: list = [None] * world
    dist.all_gather_object(parts, compute(mine) if mine else [])
    results: list = [None] * len(items)
    for r, part in enumerate(parts):
        results[r::world] = part
    return results


@dataclass
class DataLimits:
    train: int | None = None
    dev: int | None = None
    test: int | None = None


def _limit(items: list, n: int | None) -> list:
    return items[:n] if n else items


class ClassificationObjective:
    metric = "dev_acc"

    def __init__(self, name: str, tokenizer, data_dir, limits: DataLimits, max_length: int,
                 paraphrase_head: str = "cloze") -> None:
        self.name = name
        self.task: ClassificationTask = CLASSIFICATION_TASKS[name]
        self.tokenizer, self.paraphrase_head = tokenizer, paraphrase_head
        self.train = _limit(self.task.load("train", data_dir), limits.train)
        self.dev = _limit(self.task.load("dev", data_dir), limits.dev)
        self.test = _limit(self.task.load("test", data_dir), limits.test)
        length = self.max_length = min(self.task.max_length, max_length)
        self.encoded = encode(tokenizer, [self.task.to_text(e) for e in self.train], length,
                              self.task.truncation_side)
        self.lengths = [len(ids) for ids in self.encoded.ids]
        self.labels = torch.tensor([e.label for e in self.train])

    def make_head(self, model: nn.Module) -> nn.Module:
        return self.task.make_head(model, self.paraphrase_head)

    def batches(self, epoch: int, batch_size: int, seed: int, bucket: bool = True) -> list[list[int]]:
        return make_batches(self.lengths, batch_size, bucket=bucket, shuffle=True, seed=seed * 100_003 + epoch)

    def loss(self, model: nn.Module, head: nn.Module, batch: list[int], device: str) -> torch.Tensor:
        ids, mask = collate([self.encoded.ids[i] for i in batch], side="right")
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(ids, attention_mask=mask, return_logits=False).last_hidden_state
        return F.cross_entropy(head(hidden, mask), self.labels[batch].to(device))

    def _predict(self, model, head, examples, device, shard) -> list[int]:
        def run(part):
            return predict(self.task, model, head, self.tokenizer, part, device=device,
                           max_length=self.max_length).predictions
        return sharded(examples, shard, run)

    def evaluate(self, model: nn.Module, head: nn.Module, out_dir: Path | None, device: str,
                 with_train: bool = False, shard: tuple[int, int] = (0, 1)) -> dict:
        """Dev metrics (every rank evaluates its share; predictions are gathered); the rank given an
        `out_dir` writes dev and test predictions."""
        dev = self._predict(model, head, self.dev, device, shard)
        metrics = classification_metrics(self.dev, dev, self.task.num_labels)
        if with_train:  # sanity check for overfitting runs: accuracy on the training examples
            train = self._predict(model, head, self.train, device, shard)
            metrics["train_acc"] = sum(p == e.label for p, e in zip(train, self.train, strict=True)) / len(self.train)
        test = self._predict(model, head, self.test, device, shard)
        if out_dir is not None:
            files = {"dev": f"{self.name}-dev-output.csv", "test": f"{self.name}-test-output.csv"}
            write_classification(out_dir / files["dev"], self.name, [e.id for e in self.dev], dev)
            write_classification(out_dir / files["test"], self.name, [e.id for e in self.test], test)
            metrics["predictions"] = files
        return metrics


@dataclass
class SonnetObjective:
    tokenizer: object
    data_dir: object
    limits: DataLimits
    max_length: int
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "sonnet"
    metric: str = "dev_chrf"

    def __post_init__(self) -> None:
        self.train = _limit(load_sonnets("train", self.data_dir), self.limits.train)
        self.dev_prompts = _limit(load_sonnets("dev_prompts", self.data_dir), self.limits.dev)
        self.test_prompts = _limit(load_sonnets("test_prompts", self.data_dir), self.limits.test)
        self.gold = load_sonnets("dev_gold", self.data_dir)
        eos = self.tokenizer.eos_token
        self.encoded = encode(self.tokenizer, [body + eos for _, body in self.train], self.max_length)
        self.lengths = [len(ids) for ids in self.encoded.ids]

    def make_head(self, model: nn.Module) -> None:
        return None

    def batches(self, epoch: int, batch_size: int, seed: int, bucket: bool = True) -> list[list[int]]:
        return make_batches(self.lengths, batch_size, bucket=bucket, shuffle=True, seed=seed * 100_003 + epoch)

    def loss(self, model: nn.Module, head: None, batch: list[int], device: str) -> torch.Tensor:
        ids, mask = collate([self.encoded.ids[i] for i in batch], side="right")
        ids, mask = ids.to(device), mask.to(device)
        return model(ids, attention_mask=mask, labels=ids).loss  # padding positions are ignored

    def evaluate(self, model: nn.Module, head: None, out_dir: Path | None, device: str,
                 with_train: bool = False, shard: tuple[int, int] = (0, 1)) -> dict:
        generate = lambda prompts: generate_sonnets(model, self.tokenizer, prompts, self.generation, device)  # noqa: E731
        dev = sharded(self.dev_prompts, shard, generate)
        metrics = {"dev_chrf": sonnet_chrf(dev, self.gold)}
        test = sharded(self.test_prompts, shard, generate)
        if out_dir is not None:
            files = {"dev": "sonnet-dev-output.txt", "test": "sonnet-test-output.txt"}
            write_sonnets(out_dir / files["dev"], dev)
            write_sonnets(out_dir / files["test"], test)
            metrics["predictions"] = files
        return metrics


def score_for_selection(metrics_by_task: dict[str, dict]) -> float:
    """Mean of the tasks' dev metrics with chrF scaled to [0, 1] (one task: its metric)."""
    values = []
    for metrics in metrics_by_task.values():
        values.append(metrics["dev_chrf"] / 100 if "dev_chrf" in metrics else metrics["dev_acc"])
    return sum(values) / len(values)
