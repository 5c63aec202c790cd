"""SST-5 (labels 0-4) and CFIMDB (0/1) sentiment files: `ids-{sst,cfimdb}-{train,dev,test-student}.csv`."""

from __future__ import annotations

from pathlib import Path

from task_data.common import Example, data_dir, int_label, read_tsv

NUM_LABELS = {"sst": 5, "cfimdb": 2}
SPLIT_FILES = {"train": "ids-{name}-train.csv", "dev": "ids-{name}-dev.csv", "test": "ids-{name}-test-student.csv"}


def load_sentiment(name: str, split: str, directory: str | Path | None = None, bad_rows: str = "skip") -> list[Example]:
    if name not in NUM_LABELS:
        raise ValueError(f"unknown sentiment dataset {name!r}; choose from {list(NUM_LABELS)}")
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLIT_FILES)}")
    path = data_dir(directory) / SPLIT_FILES[split].format(name=name)
    labelled = split != "test"
    return read_tsv(
        path,
        ("sentence",),
        "sentiment" if labelled else None,
        int_label(range(NUM_LABELS[name])) if labelled else None,
        bad_rows,
    )
