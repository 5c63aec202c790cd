"""The four tasks: data + inputs + head + metric. Training and evaluation share them.

A classification task turns examples into token sequences, runs the model once per length-bucketed
batch, and reads its head at the last real token. The sonnet task completes 3-line prompts with the
model's KV-cache `generate` and scores them with chrF against the gold sonnets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from datasets.batching import collate, encode, make_batches, padding_fraction
from datasets.common import Example
from datasets.paraphrase import cloze_prompt, load_paraphrase
from datasets.sentiment import NUM_LABELS, load_sentiment
from model.heads import ClozeParaphraseHead, LinearParaphraseHead, SentimentHead
from train.metrics import accuracy, chrf, macro_f1


@dataclass
class ClassificationTask:
    name: str  # sst | cfimdb | quora
    num_labels: int
    load: Callable[[str, object], list[Example]]
    to_text: Callable[[Example], str]
    truncation_side: str  # quora keeps the end: the question asked of the model is there
    max_length: int

    def make_head(self, model: nn.Module, paraphrase_head: str = "cloze") -> nn.Module:
        dropout = model.config.resid_pdrop
        if self.name != "quora":
            return SentimentHead(model.config.n_embd, self.num_labels, dropout)
        if paraphrase_head == "cloze":
            return ClozeParaphraseHead(model.lm_head)
        if paraphrase_head == "linear":
            return LinearParaphraseHead(model.config.n_embd, dropout)
        raise ValueError(f"unknown paraphrase head {paraphrase_head!r}; choose cloze or linear")


CLASSIFICATION_TASKS = {
    "sst": ClassificationTask("sst", NUM_LABELS["sst"], lambda split, d: load_sentiment("sst", split, d),
                              lambda e: e.text, "right", 128),
    "cfimdb": ClassificationTask("cfimdb", NUM_LABELS["cfimdb"], lambda split, d: load_sentiment("cfimdb", split, d),
                                 lambda e: e.text, "right", 512),
    "quora": ClassificationTask("quora", 2, lambda split, d: load_paraphrase(split, d),
                                lambda e: cloze_prompt(e.text), "left", 128),
}


@dataclass
class PredictionRun:
    predictions: list[int]
    seconds: float
    padding_unbucketed: float
    padding_bucketed: float
    truncated: int


@torch.no_grad()
def predict(task: ClassificationTask, model: nn.Module, head: nn.Module, tokenizer, examples: list[Example],
            batch_size: int = 32, bucket: bool = True, device: str = "cpu",
            max_length: int | None = None) -> PredictionRun:
    max_length = min(max_length or task.max_length, model.config.n_positions)
    encoded = encode(tokenizer, [task.to_text(e) for e in examples], max_length, task.truncation_side)
    lengths = [len(ids) for ids in encoded.ids]
    batches = make_batches(lengths, batch_size, bucket=bucket)
    plain = padding_fraction(lengths, make_batches(lengths, batch_size, bucket=False))
    was_training = model.training, head.training
    model.eval()
    head.eval()
    predictions = [0] * len(examples)
    start = time.perf_counter()
    for batch in batches:
        ids, mask = collate([encoded.ids[i] for i in batch], side="right")
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(ids, attention_mask=mask, return_logits=False).last_hidden_state
        for index, label in zip(batch, head(hidden, mask).argmax(-1).tolist(), strict=True):
            predictions[index] = label
    seconds = time.perf_counter() - start
    model.train(was_training[0])
    head.train(was_training[1])
    return PredictionRun(predictions, seconds, plain, padding_fraction(lengths, batches), encoded.truncated)


def classification_metrics(examples: list[Example], predictions: list[int], num_labels: int) -> dict[str, float]:
    gold = [e.label for e in examples]
    return {"dev_acc": accuracy(gold, predictions), "dev_f1": macro_f1(gold, predictions, range(num_labels))}


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
def generate_sonnets(model: nn.Module, tokenizer, prompts: list[tuple[str, str]], settings: GenerationSettings,
                     device: str = "cpu") -> list[tuple[str, str]]:
    """Complete each 3-line prompt; keep the first `settings.lines` lines of prompt + continuation."""
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    sonnets = []
    for number, prompt in prompts:
        text = prompt + "\n"
        ids = torch.tensor([tokenizer.encode(text)], device=device)
        budget = min(settings.max_new_tokens, model.config.n_positions - ids.shape[1])
        out = model.generate(ids, max_new_tokens=budget, do_sample=settings.do_sample,
                             temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                             eos_token_id=tokenizer.eos_token_id, generator=generator)
        continuation = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        lines = [line.rstrip() for line in (text + continuation).split("\n")]
        sonnets.append((number, "\n".join(lines[:settings.lines]).strip()))
    return sonnets


def sonnet_chrf(generated: list[tuple[str, str]], gold: list[tuple[str, str]]) -> float:
    """The course's scoring: corpus chrF of generated sonnets against the gold, in order."""
    gold_by_number = dict(gold)
    missing = [number for number, _ in generated if number not in gold_by_number]
    if missing:
        raise ValueError(f"generated sonnets {missing} have no gold sonnet")
    return chrf([body for _, body in generated], [gold_by_number[number] for number, _ in generated])
