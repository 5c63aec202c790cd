"""Quora paraphrase pairs: `quora-{train,dev,test-student}.csv`, labels "0.0"/"1.0" -> 0/1.

The cloze prompt is one template for train and test; the answer is read at the token after it.
"""

from __future__ import annotations

from pathlib import Path

from task_data.common import Example, data_dir, int_label, read_tsv

SPLIT_FILES = {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"}
PROMPT = 'Question 1: "{}" Question 2: "{}" Are these questions asking the same thing?'


def load_paraphrase(split: str, directory: str | Path | None = None, bad_rows: str = "skip") -> list[Example]:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLIT_FILES)}")
    labelled = split != "test"
    return read_tsv(
        data_dir(directory) / SPLIT_FILES[split],
        ("sentence1", "sentence2"),
        "is_duplicate" if labelled else None,
        int_label(range(2)) if labelled else None,
        bad_rows,
    )


def cloze_prompt(pair: tuple[str, str]) -> str:
    return PROMPT.format(*pair)
