"""Where the task data live, fetching them when missing, and reading the release's tab-separated files.

Data folder: an explicit `--data_dir`, else `$GPT2_DATA_DIR`, else `./data/cs224n` when it exists
(where `scripts/download_data.py` writes by default), else the user cache
`${XDG_CACHE_HOME:-~/.cache}/gpt2-variants/cs224n`. When files are missing and no explicit folder
was given, `ensure_data` fetches them there (pinned commit, checksums verified; `$GPT2_DATA_URL`
points at a mirror); an explicit folder is never written to.

Every row is checked as it is read; a problem is reported as `file:line: what is wrong`. Rows the
release itself ships broken (an empty label, e.g. two rows of Quora train) are skipped with ONE
counted warning per file (the Python API's `bad_rows="error"` refuses them instead).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from task_data.download import BASE_URL, download

log = logging.getLogger(__name__)

DATA_ENV = "GPT2_DATA_DIR"
DOWNLOAD_HINT = "python scripts/download_data.py --out {dir}"
BAD_ROW_POLICIES = ("skip", "error")


class DataError(ValueError):
    """A data file that is missing or invalid; the message names the file (and line)."""


@dataclass
class Example:
    id: str
    text: str | tuple[str, str]  # one sentence, or a sentence pair (paraphrase)
    label: int | None  # None in the test files (no labels there)


URL_ENV = "GPT2_DATA_URL"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2-variants" / "cs224n"


def data_dir(explicit: str | Path | None = None) -> Path:
    """An explicit folder, else $GPT2_DATA_DIR, else ./data/cs224n if present, else the user cache."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    local = Path("data/cs224n")
    return local if local.is_dir() else cache_dir()


def ensure_data(names: list[str], explicit: str | Path | None = None) -> Path:
    """The data folder, with `names` present: missing files are fetched into it (with a progress bar)
    unless the folder was given explicitly; DataError (one line, naming the download command) when
    that is impossible."""
    folder = data_dir(explicit)
    missing = [name for name in names if not (folder / name).is_file()]
    if not missing:
        return folder
    hint = DOWNLOAD_HINT.format(dir=folder)
    if explicit is not None:
        raise DataError(f"{folder} lacks {', '.join(missing)}; fetch the task data with: {hint}")
    print(f"fetching {len(missing)} task data file(s) into {folder}", file=sys.stderr, flush=True)
    report = download(folder, os.environ.get(URL_ENV, BASE_URL), missing, timeout=30.0, progress=sys.stderr.isatty())
    if report.failed:
        name, reason = next(iter(report.failed.items()))
        raise DataError(
            f"the task data are not in {folder} and fetching them failed ({name}: {' '.join(reason.split())}); "
            f"on a machine with internet run: {hint} (then copy the folder here, or pass --data_dir)"
        )
    return folder


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found; fetch the task data with: {DOWNLOAD_HINT.format(dir=path.parent)}")
    return path


def read_tsv(
    path: Path,
    columns: tuple[str, ...],
    label_column: str | None,
    parse_label: Callable[[str], int] | None,
    bad_rows: str = "skip",
) -> list[Example]:
    """Rows of a release file as Examples. `columns` are the text columns (one or two)."""
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    require_file(path)
    examples: list[Example] = []
    skipped: list[int] = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            header = reader.fieldnames or []
            needed = ("id", *columns, *([label_column] if label_column else []))
            missing = [c for c in needed if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing}; header has {header}")
            for row in reader:
                line = reader.line_num
                if None in row or any(row.get(c) is None for c in needed):
                    # DictReader fills a short row with None and puts a long row's extra fields under None
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    raise DataError(f"{path}:{line}: wrong number of fields ({fields} for {len(header)} columns)")
                label = None
                if label_column is not None:
                    raw = row[label_column].strip()
                    if not raw:  # shipped broken by the release itself (its text is mangled too)
                        if bad_rows == "error":
                            raise DataError(f"{path}:{line}: empty {label_column} (bad_rows='error')")
                        skipped.append(line)
                        continue
                    try:
                        label = parse_label(raw)
                    except ValueError as error:
                        raise DataError(f"{path}:{line}: {label_column} {raw!r}: {error}") from None
                texts = tuple(row[c].strip() for c in columns)
                for column, text in zip(columns, texts, strict=True):
                    if not text:
                        raise DataError(f"{path}:{line}: empty {column}")
                if not row["id"].strip():
                    raise DataError(f"{path}:{line}: empty id")
                text = texts[0] if len(texts) == 1 else texts
                examples.append(Example(row["id"].strip(), text, label))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise DataError(f"{path}: unreadable line: {error}") from None
    if skipped:
        log.warning(
            "%s: skipped %d row(s) with an empty label (lines %s), as the release ships them broken",
            path,
            len(skipped),
            ", ".join(map(str, skipped)),
        )
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def int_label(allowed: range) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = float(raw)  # Quora writes "0.0"/"1.0"
        if value != int(value) or int(value) not in allowed:
            raise ValueError(f"label outside {{{', '.join(map(str, allowed))}}}")
        return int(value)

    return parse


def stratified_fraction(
    labels: list[int], fraction: float, seed: int, what: str = "the training set", all_labels: range | None = None
) -> list[int]:
    """Indices (in data order) of a seeded, stratified `fraction` of labelled examples: round(fraction
    x count) of each label, drawn without replacement. Raises DataError when that leaves a label with
    no example (one of `all_labels`, the labels the task scores, or of those present), so a subset
    that misses a class is refused instead of training silently on fewer classes than are scored."""
    import random

    if not 0 < fraction <= 1:
        raise DataError(f"a fraction of {what} must be in (0, 1], got {fraction}")
    by_label: dict[int, list[int]] = {label: [] for label in all_labels or ()}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    rng = random.Random(seed)
    chosen: list[int] = []
    sizes = {label: round(fraction * len(members)) for label, members in sorted(by_label.items())}
    empty = {label: len(by_label[label]) for label, size in sizes.items() if size == 0}
    if empty:
        raise DataError(
            f"a fraction {fraction} of {what} has no example of label(s) "
            + ", ".join(f"{label} ({count} there)" for label, count in empty.items())
            + "; every label must be in the subset: raise the fraction"
        )
    for label, size in sizes.items():
        chosen += rng.sample(by_label[label], size)
    return sorted(chosen)
