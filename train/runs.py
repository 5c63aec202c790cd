"""The per-run log, wandb, and the `runs.tsv` summary (one row per run).

A run's identity and folder name are train/spec.py's (`RunSpec`); a row of `runs.tsv` is keyed by that
identity (task, `config_hash`, seed), not by the folder's path, so a moved or copied run that is
resumed or extended still has one row.
"""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from model.files import atomic_write_text

log = logging.getLogger(__name__)
RUNS_COLUMNS = [
    "run",
    "task",
    "variant",
    "label",
    "config_hash",
    "seed",
    "lr",
    "fine_tune_mode",
    "trainable_params",
    "total_params",
    "metric",
    "best_value",
    "best_step",
    "dev_metrics",
    "train_seconds",
    "steps",
    "seconds_per_step",
    "generation_seconds",
    "peak_memory_mb",
    "git_commit",
    "run_dir",
    "finished_at",
]


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parents[1],
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _locked(path: Path):
    """An exclusive lock beside `path`, so parallel runs never interleave or lose rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_suffix(".tsv.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def rewrite_runs_rows(path: Path, update, row: dict[str, Any] | None = None) -> None:
    """Rewrite runs.tsv (atomically, under its lock): each row through `update(fields)` (a dict to keep,
    possibly changed, or None to drop it), then `row` appended."""
    with _locked(path):
        lines = path.read_text().splitlines() if path.exists() else []
        header, rows = "\t".join(RUNS_COLUMNS), []
        if lines:
            header, rows = lines[0], lines[1:]
        names = header.split("\t")
        if set(names) <= set(RUNS_COLUMNS):  # a file of an older version: its columns, then the new ones
            names += [c for c in RUNS_COLUMNS if c not in names]
            header = "\t".join(names)
        kept = []
        for line in rows:
            if not line.strip():
                continue
            fields = update(dict(zip(names, line.split("\t"), strict=False)))
            if fields is not None:
                kept.append(_row_line(names, fields))
        if row is not None:
            kept.append(_row_line(names, row))
        atomic_write_text(path, "\n".join([header, *kept]) + "\n")


def _row_line(names: list[str], row: dict[str, Any]) -> str:
    return "\t".join(str(row.get(c, "")).replace("\t", " ").replace("\n", " ") for c in names)


def same_run(fields: dict[str, str], row: dict[str, Any]) -> bool:
    """One run: the same folder, or the same identity (task, configuration hash and seed) wherever it lies."""
    if fields.get("run_dir") == str(row["run_dir"]):
        return True
    keys = ("task", "config_hash", "seed")
    return all(str(fields.get(k)) == str(row[k]) for k in keys)


def write_runs_row(path: Path, row: dict[str, Any]) -> None:
    """Add a finished run's row to runs.tsv, replacing any earlier row of the same run: a run never has
    two rows (a resumed, extended, moved or copied run updates its own)."""
    rewrite_runs_rows(path, lambda fields: None if same_run(fields, row) else fields, row)


def drop_runs_row(path: Path, run_dir: Path) -> None:
    """Remove a run folder's row (used by --overwrite)."""
    if path.exists():
        rewrite_runs_rows(path, lambda fields: None if fields.get("run_dir") == str(run_dir) else fields)


def log_entries(path: Path) -> list[tuple[str, int]]:
    """(line, step) of every readable line of a log.jsonl; a line cut by a crash is left out."""
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append((line, int(json.loads(line)["step"])))
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def truncate_log(path: Path, last_step: int) -> int:
    """Drop log.jsonl lines after `last_step` (logged after the checkpoint a run resumes from), so a
    resumed run's log never repeats a step. Returns how many lines were dropped."""
    if not path.exists():
        return 0
    total = len(path.read_text().splitlines())
    kept = [line for line, step in log_entries(path) if step <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return total - len(kept)


class RunLogger:
    """Per-step JSON lines in `log.jsonl`, mirrored to wandb when it is available (offline by default)."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        run_id: str,
        group: str,
        tags: list[str],
        config: dict,
        mode: str,
        project: str,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.wandb = None
        if not enabled or mode == "disabled":
            return
        try:
            import wandb
        except Exception as error:  # noqa: BLE001 - any import failure means: no wandb, keep training
            warnings.warn(f"wandb is unavailable ({error}); logging to {self.path} only", stacklevel=2)
            return

        def start(run_mode: str):
            return wandb.init(
                project=project,
                name=name,
                group=group,
                tags=tags,
                config=config,
                mode=run_mode,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=True),
            )

        try:
            self.wandb = start(mode)
        except Exception as error:  # noqa: BLE001
            if mode == "online":  # no login (or no network): keep an offline copy that can be synced later
                try:
                    self.wandb = start("offline")
                    print(
                        f"warning: wandb online failed ({type(error).__name__}: {error}); logging offline "
                        f"instead. Upload it later with: wandb sync {run_dir / 'wandb'}",
                        file=sys.stderr,
                    )
                    return
                except Exception as second:  # noqa: BLE001
                    error = second
            warnings.warn(f"wandb.init failed ({error}); logging to {self.path} only", stacklevel=2)

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def replay(self, last_step: int) -> int:
        """Send wandb the log.jsonl steps it lacks (a SIGKILL loses what wandb had not written; a resumed
        offline run starts an empty history): every logged step from wandb's own next step up to
        `last_step`. Returns how many lines were sent."""
        if self.wandb is None:
            return 0
        first = int(getattr(self.wandb, "step", 0) or 0)
        sent = 0
        for line, step in log_entries(self.path):
            if first <= step <= last_step:
                values = {k: v for k, v in json.loads(line).items() if k not in ("step", "time")}
                self.wandb.log(values, step=step)
                sent += 1
        return sent

    def finish(self, exit_code: int = 0) -> None:
        """Close the wandb run; a non-zero `exit_code` (130 / 143 interrupted, 3 diverged, 1 crashed)
        marks it as not finished, with `run_state` in its summary saying why."""
        if self.wandb is None:
            return
        if exit_code:
            state = {130: "interrupted", 143: "interrupted", 3: "diverged"}.get(exit_code, "crashed")
            self.wandb.summary.update({"run_state": state, "exit_code": exit_code})
        self.wandb.finish(exit_code=exit_code)
        self.wandb = None
