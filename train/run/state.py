"""A run folder's state as its files show it (new, dead, interrupted, finished), its complete checkpoint
folders, and the error every rule about a run folder raises. Nothing here imports torch, so a launcher's
job process that only watches folders stays light (so do train/run/log.py and train/run/lock.py)."""

from __future__ import annotations

import json
from pathlib import Path


class RunFolderError(ValueError):
    """A run folder that cannot be started or resumed as asked; the message says what to pass."""


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


def saved_checkpoints(directory: Path, kind: str) -> list[Path]:
    """The complete `<kind>-<step>[.<n>]` checkpoint folders in `directory`, oldest first: all three files
    there and state.json naming the folder's own step. What a resume falls back on when the pointer
    (`<kind>.json`) is missing or bad: the folders, not the pointer, are the record."""
    found = []
    for folder in directory.glob(f"{kind}-*") if directory.is_dir() else ():
        stem, _, again = folder.name.removeprefix(f"{kind}-").partition(".")
        if not (folder.is_dir() and stem.isdigit() and (again.isdigit() or not again)):
            continue
        if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
            continue
        try:
            step = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if step == int(stem):
            found.append((int(stem), int(again or 0), folder))
    return [folder for *_, folder in sorted(found)]


def folder_state(run_dir: Path) -> str:
    """new, dead (files but no checkpoint), interrupted (a checkpoint to resume) or finished (metrics.json).
    A checkpoint folder counts without its pointer (`last.json` lost or damaged)."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.json").is_file() or saved_checkpoints(checkpoints, "last"):
        return "interrupted"
    if run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):  # the lock alone is no run
        return "dead"
    return "new"
