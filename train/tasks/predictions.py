"""Course-format prediction files, written atomically, and read back for re-scoring.

Classification: a header line, then `id , label` per line (labels are class indices), e.g.
    id \t Predicted_Sentiment
    32a4f146782cbde1b7fa65799 , 3
Sonnets: `--Generated Sonnets--`, then for each sonnet a blank line, its number, and its 14 lines.
"""

from __future__ import annotations

from pathlib import Path

from model.files import atomic_write_text
from task_data.sonnets import read_sonnet_file


def write_classification(path: Path, header: str, ids: list[str], labels: list[int]) -> None:
    """`header` is the task's column name (e.g. Predicted_Sentiment)."""
    lines = [f"id \t {header} "] + [f"{i} , {label} " for i, label in zip(ids, labels, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_classification(path: Path) -> dict[str, int]:
    predictions = {}
    for number, line in enumerate(Path(path).read_text().splitlines()[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'id , label', got {line!r}")
        predictions[parts[0]] = int(parts[1])
    return predictions


def write_sonnets(path: Path, sonnets: list[tuple[str, str]]) -> None:
    atomic_write_text(path, "--Generated Sonnets-- \n\n" + "".join(f"\n{number}\n{body}\n" for number, body in sonnets))


def read_sonnets(path: Path) -> list[tuple[str, str]]:
    return read_sonnet_file(Path(path))
