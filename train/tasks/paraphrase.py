"""Quora paraphrase detection as a cloze: 'Question 1: "…" Question 2: "…" Are these questions
asking the same thing?' and the LM's "no"/"yes" logits at the last token (`--paraphrase_head
cloze`, no new parameters), or a linear head on that token (`--paraphrase_head linear`).
Long pairs are cut from the left: the question asked of the model is at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from model.heads import ClozeParaphraseHead, LastTokenClassifier
from modules.variant import knob
from task_data.common import Example
from task_data.paraphrase import SPLIT_FILES, cloze_prompt, load_paraphrase
from train.base.settings import CommandSettings
from train.tasks.base import register_task
from train.tasks.classification import ClassificationTask


@dataclass(frozen=True)
class ParaphraseSettings(CommandSettings):
    title: ClassVar[str] = "quora (part of the run's identity)"

    paraphrase_head: Literal["cloze", "linear"] = knob(
        "cloze", "quora: the LM's yes/no logits (cloze) or a linear head"
    )


@register_task
class Quora(ClassificationTask):
    name = "quora"
    num_labels = 2
    truncation_side = "left"
    default_max_length = 128
    prediction_header = "Predicted_Is_Paraphrase"

    settings = ParaphraseSettings

    @classmethod
    def data_files(cls) -> list[str]:
        return list(SPLIT_FILES.values())

    def load(self, split: str) -> list[Example]:
        return load_paraphrase(split, self.data_dir)

    def to_text(self, example: Example) -> str:
        return cloze_prompt(example.text)

    def make_head(self, model: nn.Module) -> nn.Module:
        if self.options.paraphrase_head == "cloze":
            return ClozeParaphraseHead(model.lm_head)
        return LastTokenClassifier(model.config.n_embd, 2, model.config.resid_pdrop)
