"""Shared machinery of the classification tasks (SST, CFIMDB, Quora): a text per example, a head on
the last real token, cross-entropy, accuracy + macro-F1, course-format prediction files.

A classification task file only says what differs: how to load a split, how an example becomes a
text, its number of labels, where to truncate, its default length cap, its prediction header
and its head.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from task_data.batching import bucket_length, collate, encode, make_batches, padding_fraction
from task_data.common import Example, stratified_fraction
from train.base import console
from train.tasks.base import Task, limit, sharded
from train.tasks.metrics import accuracy, macro_f1
from train.tasks.predictions import write_classification

log = logging.getLogger(__name__)


@dataclass
class PredictionRun:
    predictions: list[int]
    seconds: float
    padding_unbucketed: float
    padding_bucketed: float
    truncated: int
    logits: torch.Tensor | None = None


def classification_metrics(examples: list[Example], predictions: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1, with the majority-class accuracy beside them: a model that always answers
    the most frequent dev label scores `dev_majority_acc` (a one-label dev set scores 1.0 that way)."""
    gold = [e.label for e in examples]
    return {
        "dev_acc": accuracy(gold, predictions),
        "dev_f1": macro_f1(gold, predictions, range(num_labels)),
        "dev_majority_acc": max(Counter(gold).values()) / len(gold),
    }


class ClassificationTask(Task):
    metric = "dev_acc"
    num_labels: ClassVar[int]
    truncation_side: ClassVar[str] = "right"  # quora keeps the end: the question asked is there
    default_max_length: ClassVar[int] = 128
    prediction_header: ClassVar[str]

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def to_text(self, example: Example) -> str:
        return example.text

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # Task's arguments
        super().__init__(*args, **kwargs)
        training, n_positions, predict_test = self.training, self.n_positions, self.predict_test
        cap = training.max_length if training.max_length is not None else self.default_max_length
        self.max_length = min(self.default_max_length, cap, n_positions)
        self.dev = limit(self.load("dev"), training.dev_limit)
        self.test = limit(self.load("test"), training.test_limit) if predict_test else []
        if len({e.label for e in self.dev}) == 1:
            log.warning(
                "%s: every dev example used has label %s, so accuracy cannot tell a model from one that always "
                "answers it (dev_majority_acc = 1.0); use more dev examples",
                self.name,
                self.dev[0].label,
            )

    # Training data is read and tokenised on first use: evaluation alone never pays for it.
    @cached_property
    def train(self) -> list[Example]:
        """The training split, after `--train_limit` (the first N) and `--train_fraction` (a seeded,
        stratified share, which must hold every label the task scores)."""
        examples = limit(self.load("train"), self.training.train_limit)
        fraction = self.training.train_fraction
        if fraction is None:
            return examples
        labels = [e.label for e in examples]
        chosen = stratified_fraction(labels, fraction, self.training.seed, f"{self.name} train", range(self.num_labels))
        return [examples[i] for i in chosen]

    def check_training_data(self) -> None:
        self.train  # noqa: B018 - reading it validates --train_limit / --train_fraction before any weight loads

    @cached_property
    def encoded(self):
        return encode(self.tokenizer, [self.to_text(e) for e in self.train], self.max_length, self.truncation_side)

    @cached_property
    def labels(self) -> torch.Tensor:
        return torch.tensor([e.label for e in self.train])

    def batches(self, epoch: int, batch_size: int, seed: int, bucket: bool = True) -> list[list[int]]:
        lengths = [len(ids) for ids in self.encoded.ids]
        return make_batches(lengths, batch_size, bucket=bucket, shuffle=True, seed=seed * 100_003 + epoch)

    def batch_tokens(self, batch: list[int]) -> int:
        return sum(len(self.encoded.ids[i]) for i in batch)

    def inputs(self, batch: list[int], rows: int | None = None) -> dict[str, torch.Tensor]:
        sequences = [self.encoded.ids[i] for i in batch]
        length = bucket_length(max(map(len, sequences)), self.max_length) if rows is not None else None
        ids, mask = collate(sequences, side="right", length=length, rows=rows)
        labels = torch.full((ids.shape[0],), -100, dtype=torch.long)  # padding rows: ignored by the loss
        labels[: len(batch)] = self.labels[batch]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_on(self, model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = model(
            inputs["input_ids"], attention_mask=mask, return_logits=False, validate=False, right_padded=True
        ).last_hidden_state
        return F.cross_entropy(head(hidden, mask), inputs["labels"], ignore_index=-100)

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        head: nn.Module,
        examples: list[Example],
        batch_size: int = 32,
        bucket: bool = True,
        device: str = "cpu",
        return_logits: bool = False,
        label: str | None = None,
    ) -> PredictionRun:
        """Predicted labels (and, with `return_logits`, the head's float32 logits in example order).
        `label`: shown as progress (train/base/console.py) while it predicts; None shows none."""
        encoded = encode(self.tokenizer, [self.to_text(e) for e in examples], self.max_length, self.truncation_side)
        lengths = [len(ids) for ids in encoded.ids]
        batches = make_batches(lengths, batch_size, bucket=bucket)
        plain = padding_fraction(lengths, make_batches(lengths, batch_size, bucket=False))
        was_training = model.training, head.training
        model.eval()
        head.eval()
        graphed = self.captured(model, head, device, encoded.ids) if self.captured is not None else None
        predictions = [0] * len(examples)
        logits: list[torch.Tensor | None] = [None] * len(examples)
        start = time.perf_counter()
        work = console.phase(label or "", total=len(batches), enabled=label is not None, unit="batches")
        with work:
            for batch in batches:
                sequences = [encoded.ids[i] for i in batch]
                scores = None
                if graphed is not None and graphed.usable:  # static shapes, one CUDA graph replay
                    length = bucket_length(max(map(len, sequences)), self.max_length)
                    ids, mask = collate(sequences, side="right", length=length, rows=batch_size)
                    scores = graphed({"input_ids": ids, "attention_mask": mask})
                    scores = None if scores is None else scores[: len(batch)]
                if scores is None:
                    ids, mask = collate(sequences, side="right")
                    ids, mask = ids.to(device), mask.to(device)
                    hidden = model(ids, attention_mask=mask, return_logits=False, right_padded=True).last_hidden_state
                    scores = head(hidden, mask)
                for index, predicted in zip(batch, scores.argmax(-1).tolist(), strict=True):
                    predictions[index] = predicted
                if return_logits:
                    for index, row in zip(batch, scores.float().cpu(), strict=True):
                        logits[index] = row
                work.advance()
        seconds = time.perf_counter() - start
        model.train(was_training[0])
        head.train(was_training[1])
        run = PredictionRun(predictions, seconds, plain, padding_fraction(lengths, batches), encoded.truncated)
        if return_logits:
            run.logits = torch.stack(logits) if examples else torch.empty(0)
        return run

    def dev_logits(
        self, model: nn.Module, head: nn.Module, device: str, shard: tuple[int, int] = (0, 1)
    ) -> torch.Tensor:
        """(n_dev, head outputs) float32 logits of `head` on this task's dev examples (every rank scores
        its share; gathered). Transfer scores another task's trained head on this task's texts with it."""
        batch_size = self.training.eval_batch_size
        rows = sharded(
            self.dev,
            shard,
            lambda part: list(self.predict(model, head, part, batch_size, device=device, return_logits=True).logits),
        )
        return torch.stack(rows)

    def _predict(self, model, head, examples, device, shard, split: str) -> list[int]:
        batch_size = self.training.eval_batch_size
        label = f"{self.name}: predicting {len(examples)} {split} examples" if shard[0] == 0 else None
        return sharded(
            examples,
            shard,
            lambda part: self.predict(model, head, part, batch_size, device=device, label=label).predictions,
        )

    def evaluate(
        self,
        model: nn.Module,
        head: nn.Module,
        out_dir: Path | None,
        device: str,
        with_train: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, Any]:
        dev = self._predict(model, head, self.dev, device, shard, "dev")
        metrics: dict[str, Any] = classification_metrics(self.dev, dev, self.num_labels)
        if with_train:  # sanity check for overfitting runs: accuracy on the training examples
            train = self._predict(model, head, self.train, device, shard, "train")
            metrics["train_acc"] = sum(p == e.label for p, e in zip(train, self.train, strict=True)) / len(self.train)
        if out_dir is not None:
            name = f"{self.name}-dev-output.csv"
            write_classification(out_dir / name, self.prediction_header, [e.id for e in self.dev], dev)
            metrics["predictions"] = {"dev": name}
        return metrics

    def test_predictions(
        self, model: nn.Module, head: nn.Module, out_dir: Path | None, device: str, shard: tuple[int, int] = (0, 1)
    ) -> dict[str, str]:
        if not self.predict_test:
            return {}
        test = self._predict(model, head, self.test, device, shard, "test")
        if out_dir is None:
            return {}
        name = f"{self.name}-test-output.csv"
        write_classification(out_dir / name, self.prediction_header, [e.id for e in self.test], test)
        return {"test": name}
