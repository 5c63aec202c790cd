"""Shakespeare sonnet files: a header, then blocks separated by a line holding the sonnet number.

Read the course's way (split on lines that hold only a number; CRLF or LF endings), keeping the
numbers as ids. `sonnets.txt` (training), `sonnets_held_out_dev.txt` (3-line prompts),
`TRUE_sonnets_held_out_dev.txt` (the 14-line gold).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from task_data.common import DataError, data_dir, require_file

log = logging.getLogger(__name__)

FILES = {
    "train": "sonnets.txt",
    "dev_prompts": "sonnets_held_out_dev.txt",
    "dev_gold": "TRUE_sonnets_held_out_dev.txt",
    "test_prompts": "sonnets_held_out.txt",
}
_NUMBER_LINE = re.compile(r"[ \t]*\d+[ \t]*")
PLAUSIBLE_LINES = 40  # a sonnet has 14 lines (a few in the corpus 12 or 15); far more means merged blocks


def read_sonnet_file(path: Path, min_lines: int = 1) -> list[tuple[str, str]]:
    """[(number, text)] for every block after the header; lines are stripped on the right."""
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    blocks: list[tuple[str, int, list[str]]] = []  # (number, line of the number, lines)
    for line_no, line in enumerate(text.split("\n"), start=1):
        if _NUMBER_LINE.fullmatch(line):
            blocks.append((line.strip(), line_no, []))
        elif blocks:
            blocks[-1][2].append(line.rstrip())
    if not blocks:
        raise DataError(f"{path}: no numbered sonnet blocks found")
    sonnets = []
    for number, line_no, lines in blocks:
        body = "\n".join(lines).strip("\n")
        if len([ln for ln in lines if ln.strip()]) < min_lines:
            raise DataError(f"{path}:{line_no}: sonnet {number} has fewer than {min_lines} line(s)")
        sonnets.append((number, body))
    longest = max(blocks, key=lambda block: len([ln for ln in block[2] if ln.strip()]))
    if (count := len([ln for ln in longest[2] if ln.strip()])) > PLAUSIBLE_LINES:
        log.warning(
            "%s:%d: sonnet %s has %d lines (a sonnet has 14): the number lines between sonnets may be missing, "
            "so several sonnets read as one",
            path,
            longest[1],
            longest[0],
            count,
        )
    last_line = sonnets[-1][1].rstrip().rsplit("\n", 1)[-1]
    if min_lines == 1 and last_line and last_line[-1].isalnum():  # every sonnet ends with a punctuation mark
        log.warning(
            "%s: the last sonnet (%s) ends mid-line (%r) without punctuation; the file may be cut short",
            path,
            sonnets[-1][0],
            last_line[-30:],
        )
    return sonnets


def load_sonnets(kind: str, directory: str | Path | None = None) -> list[tuple[str, str]]:
    if kind not in FILES:
        raise ValueError(f"unknown sonnet file kind {kind!r}; choose from {list(FILES)}")
    return read_sonnet_file(data_dir(directory) / FILES[kind], min_lines=3 if "prompts" in kind else 1)
