"""Shakespeare sonnet generation: train the LM on the sonnets (padding ignored in the loss), then
complete each held-out 3-line prompt to 14 lines with the KV-cache `generate` and score the dev
completions with corpus chrF against the gold sonnets (the course's scoring, through sacrebleu).

Sampling is seeded with the run's `--seed` (prompt i has its own stream), and prompts are batched
before they are shared over processes, so training's evaluation, `train.evaluate` of the same
weights and a torchrun evaluation with any number of processes write the same sonnets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from modules.variant import knob
from task_data.batching import bucket_length, collate, encode, make_batches
from task_data.common import DataError
from task_data.sonnets import FILES, load_sonnets
from train.base import console
from train.base.settings import CommandSettings
from train.tasks.base import Task, limit, register_task, sharded
from train.tasks.metrics import chrf
from train.tasks.predictions import write_sonnets


@dataclass
class GenerationSettings:
    max_new_tokens: int = 160
    temperature: float = 1.2
    top_p: float = 0.9
    top_k: int | None = None
    do_sample: bool = True
    seed: int = 0
    lines: int = 14  # a sonnet's length: the 3 prompt lines + 11 generated


@torch.no_grad()
def generate_sonnets(
    model: nn.Module,
    tokenizer,
    prompts: list[tuple[str, str]],
    settings: GenerationSettings,
    device: str = "cpu",
    batch_size: int = 16,
    shard: tuple[int, int] = (0, 1),
    progress: str = "",
) -> list[tuple[str, str]]:
    """Complete each 3-line prompt; keep the first `settings.lines` lines of prompt + continuation.

    Prompts are grouped into fixed, length-sorted, left-padded batches *before* they are shared out
    over the `shard` = (rank, world) processes, and prompt i samples from its own stream
    (seed, i): every process count makes the same batches and the same sonnets. `progress`: the label
    of its progress (a bar on a terminal, lines in a log; train/base/console.py; none when empty)."""
    texts = [prompt + "\n" for _, prompt in prompts]
    encoded = [tokenizer.encode(text) for text in texts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def complete(batch: list[int]) -> list[str]:
        ids, mask = collate([encoded[i] for i in batch], side="left", pad_id=tokenizer.eos_token_id)
        ids, mask = ids.to(device), mask.to(device)
        budget = min(settings.max_new_tokens, model.config.input_positions - ids.shape[1])
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=budget,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            eos_token_id=tokenizer.eos_token_id,
            row_seeds=[settings.seed * 1_000_003 + i for i in batch],
        )
        return [tokenizer.decode(row[ids.shape[1] :].tolist(), skip_special_tokens=True) for row in out]

    def complete_all(mine: list[list[int]]) -> list[list[str]]:
        # Generation is the slow part of a sonnet evaluation: progress on rank 0 (train/base/console.py).
        shown = bool(progress) and shard[0] == 0
        with console.phase(progress or "", total=len(mine), enabled=shown, unit="batches") as work:
            done = []
            for batch in mine:
                done.append(complete(batch))
                work.advance()
            return done

    done = sharded(batches, shard, complete_all)
    continuations = {
        i: text
        for batch, completed in zip(batches, done, strict=True)
        for i, text in zip(batch, completed, strict=True)
    }
    sonnets = []
    for index, (number, _) in enumerate(prompts):
        lines = [line.rstrip() for line in (texts[index] + continuations[index]).split("\n")]
        sonnets.append((number, "\n".join(lines[: settings.lines]).strip()))
    return sonnets


def sonnet_chrf(generated: list[tuple[str, str]], gold: list[tuple[str, str]]) -> float:
    """The course's scoring: corpus chrF of generated sonnets against the gold, in order."""
    gold_by_number = dict(gold)
    missing = [number for number, _ in generated if number not in gold_by_number]
    if missing:
        raise ValueError(f"generated sonnets {missing} have no gold sonnet")
    return chrf([body for _, body in generated], [gold_by_number[number] for number, _ in generated])


@dataclass(frozen=True)
class SonnetSettings(CommandSettings):
    title: ClassVar[str] = "sonnet generation, at evaluation (part of the run's identity)"

    temperature: float = knob(1.2, "sampling temperature")
    top_p: float = knob(0.9, "nucleus sampling mass", low=0, low_open=True, high=1)
    top_k: int | None = knob(None, "top-k sampling (default: off)", low=1)
    max_new_tokens: int = knob(160, "tokens per sonnet", low=1)
    greedy: bool = knob(False, "greedy decoding instead of sampling")

    def validate(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError("--temperature must be > 0 (or pass --greedy)")


@register_task
class Sonnet(Task):
    name = "sonnet"
    metric = "dev_chrf"
    metric_scale = 100.0

    settings = SonnetSettings

    @classmethod
    def data_files(cls) -> list[str]:
        return list(FILES.values())

    @classmethod
    def check_files(cls, data_dir: Path) -> None:
        """Every dev prompt needs its gold sonnet, or dev chrF fails at the first evaluation."""
        gold = {number for number, _ in load_sonnets("dev_gold", data_dir)}
        missing = [number for number, _ in load_sonnets("dev_prompts", data_dir) if number not in gold]
        if missing:
            raise DataError(
                f"{Path(data_dir) / FILES['dev_gold']}: no gold sonnet for dev prompt(s) {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); dev chrF needs one per prompt"
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # Task's arguments
        super().__init__(*args, **kwargs)
        training, n_positions, predict_test = self.training, self.n_positions, self.predict_test
        self.max_length = min(training.max_length or n_positions, n_positions)
        self.dev_prompts = limit(load_sonnets("dev_prompts", self.data_dir), training.dev_limit)
        self.test_prompts = (
            limit(load_sonnets("test_prompts", self.data_dir), training.test_limit) if predict_test else []
        )
        self.gold = load_sonnets("dev_gold", self.data_dir)
        options = self.options
        self.generation = GenerationSettings(
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            do_sample=not options.greedy,
            seed=training.seed,
        )

    @cached_property
    def train(self) -> list[tuple[str, str]]:
        return limit(load_sonnets("train", self.data_dir), self.training.train_limit)

    @cached_property
    def encoded(self):
        eos = self.tokenizer.eos_token
        return encode(self.tokenizer, [body + eos for _, body in self.train], self.max_length)

    def make_head(self, model: nn.Module) -> None:
        return None

    def batches(self, epoch: int, batch_size: int, seed: int, bucket: bool = True) -> list[list[int]]:
        lengths = [len(ids) for ids in self.encoded.ids]
        return make_batches(lengths, batch_size, bucket=bucket, shuffle=True, seed=seed * 100_003 + epoch)

    def batch_tokens(self, batch: list[int]) -> int:
        return sum(len(self.encoded.ids[i]) for i in batch)

    def inputs(self, batch: list[int], rows: int | None = None) -> dict[str, torch.Tensor]:
        sequences = [self.encoded.ids[i] for i in batch]
        length = bucket_length(max(map(len, sequences)), self.max_length) if rows is not None else None
        ids, mask = collate(sequences, side="right", length=length, rows=rows)
        return {"input_ids": ids, "attention_mask": mask}

    def loss_on(self, model: nn.Module, head: None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        # padding positions (and all-padding rows) are ignored by the loss
        return model(ids, attention_mask=mask, labels=ids, validate=False, right_padded=True).loss

    def evaluate(
        self,
        model: nn.Module,
        head: None,
        out_dir: Path | None,
        device: str,
        with_train: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, Any]:
        started = time.perf_counter()
        dev = self._generate(model, self.dev_prompts, "dev", device, shard)
        metrics: dict[str, Any] = {"dev_chrf": sonnet_chrf(dev, self.gold)}
        metrics["generation_seconds"] = round(time.perf_counter() - started, 3)
        if out_dir is not None:
            write_sonnets(out_dir / "sonnet-dev-output.txt", dev)
            metrics["predictions"] = {"dev": "sonnet-dev-output.txt"}
        return metrics

    def test_predictions(
        self, model: nn.Module, head: None, out_dir: Path | None, device: str, shard: tuple[int, int] = (0, 1)
    ) -> dict[str, str]:
        if not self.predict_test:
            return {}
        test = self._generate(model, self.test_prompts, "test", device, shard)
        if out_dir is None:
            return {}
        write_sonnets(out_dir / "sonnet-test-output.txt", test)
        return {"test": "sonnet-test-output.txt"}

    def _generate(self, model: nn.Module, prompts, split: str, device: str, shard: tuple[int, int]):
        batch_size, label = self.training.eval_batch_size, f"generating {len(prompts)} {split} sonnets"
        return generate_sonnets(model, self.tokenizer, prompts, self.generation, device, batch_size, shard, label)
