"""The per-run log (`log.jsonl`) and its wandb mirror. The `runs.tsv` index is train/run/index.py's; the
folder's state is train/run/state.py's, its lock train/run/lock.py's and its record train/run/folder.py's.
Nothing here imports torch, so a launcher's job process that only watches folders stays light."""

from __future__ import annotations

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


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parents[2],
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_entries(path: Path) -> list[tuple[str, int]]:
    """(line, step) of every readable line of a log.jsonl; a line cut by a crash, or damaged (not UTF-8,
    not JSON), is left out."""
    entries = []
    for raw in path.read_bytes().splitlines() if path.exists() else []:
        try:
            line = raw.decode("utf-8")
            entries.append((line, int(json.loads(line)["step"])))
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def truncate_log(path: Path, last_step: int) -> tuple[int, int]:
    """Drop log.jsonl lines after `last_step` (logged after the checkpoint a run resumes from), so a
    resumed run's log never repeats a step, and lines that cannot be read (cut by a crash, damaged).
    Returns (lines after the checkpoint, unreadable lines) dropped."""
    if not path.exists():
        return 0, 0
    total = len(path.read_bytes().splitlines())
    entries = log_entries(path)
    kept = [line for line, step in entries if step <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(entries) - len(kept), total - len(entries)


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
        job_type: str | None = None,
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
                job_type=job_type,  # a grid's stage (tune / final), so wandb can split its runs as the report does
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
