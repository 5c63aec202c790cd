"""Run identity, the per-run log, wandb, and the `runs.tsv` summary (one row per run).

A run's identity covers every setting that changes its result: the task, the resolved model
config (checkpoint size + every variant knob), the model it starts from and every training flag
except where outputs go and how they are logged (`IDENTITY_EXCLUDED`). Its folder name is
readable, `<task>-<variant tags>-lr<lr>-s<seed>-<hash>`, where `hash` is 8 hex digits of the
SHA-256 of those settings without the seed (so the seeds of one configuration share it and the
report groups them). Two runs that differ in any one setting get different folders; the wandb run
id is that hash, the seed and a random suffix drawn when the folder is created (kept in its
config.json, so a resumed run continues the same wandb run and runs in two out dirs never merge).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import secrets
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from model.files import atomic_write_text
from modules.registry import enabled_variants

log = logging.getLogger(__name__)
RUNS_COLUMNS = [
    "run",
    "task",
    "variant",
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
    "peak_memory_mb",
    "steps",
    "git_commit",
    "run_dir",
    "finished_at",
]
# Flags that say where things go or how they are logged, not what is computed.
IDENTITY_EXCLUDED = {
    "out_dir",
    "resume",
    "wandb",
    "wandb_project",
    "wandb_group",
    "data_dir",
    "tokenizer",
    "device",
    "save_every",
    "save_every_minutes",
    "log_every",
    "spike_factor",
    "eval_train",
    "overwrite",
    "extend_epochs",
    "compile",  # how the same maths is executed, not what it computes
    "fast_step",
    "grad_checkpointing",
    "argv",
}
# Flags added after run folders existed: left out of the identity while at their default, so those
# folders keep their names (and --resume keeps finding them).
OMITTED_AT_DEFAULT = {"train_fraction": None}
MODE_TAGS = {"full-model": "full", "last-linear-layer": "lastlinear", "adapters": "adapters"}


def variant_tag(config: Any) -> str:
    parts = [variant.tag(config) for variant in enabled_variants(config)] or ["base"]
    mode = config.resolved_fine_tune_mode
    if mode != ("adapters" if config.any_variant else "full-model"):
        parts.append(MODE_TAGS[mode])
    return "+".join(parts)


def identity_settings(task_label: str, config: Any, args: Any) -> dict[str, Any]:
    """Everything that changes a run's result, seed excluded (it is in the name itself)."""
    config_values = config.to_dict()
    config_values.pop("name")  # provenance; the `model` flag below says what was loaded
    training = {
        k: v
        for k, v in sorted(vars(args).items())
        if k not in IDENTITY_EXCLUDED and k not in config_values and k not in ("seed", "name")
        if not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])
    }
    return {"task": task_label, "config": config_values, "training": training}


def config_hash(task_label: str, config: Any, args: Any) -> str:
    text = json.dumps(identity_settings(task_label, config, args), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(task_label: str, config: Any, args: Any) -> str:
    return f"{task_label}-{variant_tag(config)}-lr{args.lr:g}-s{args.seed}-{config_hash(task_label, config, args)}"


def new_wandb_id(task_label: str, config: Any, args: Any) -> str:
    return f"{config_hash(task_label, config, args)}-s{args.seed}-{secrets.token_hex(3)}"


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


def _rewrite_rows(path: Path, keep, row: dict[str, Any] | None) -> None:
    """Rewrite runs.tsv (atomically, under the lock) keeping the rows `keep(fields)` accepts, then `row`."""
    with _locked(path):
        lines = path.read_text().splitlines() if path.exists() else []
        header, rows = "\t".join(RUNS_COLUMNS), []
        if lines:
            header, rows = lines[0], lines[1:]
        names = header.split("\t")
        kept = [line for line in rows if line.strip() and keep(dict(zip(names, line.split("\t"), strict=False)))]
        if row is not None:
            values = [str(row.get(c, "")).replace("\t", " ").replace("\n", " ") for c in names]
            kept.append("\t".join(values))
        atomic_write_text(path, "\n".join([header, *kept]) + "\n")


def write_runs_row(path: Path, row: dict[str, Any]) -> None:
    """Add a finished run's row to runs.tsv, replacing any earlier row of the same run folder: a run
    folder never has two rows (a resumed or extended run updates its own)."""
    _rewrite_rows(path, lambda fields: fields.get("run_dir") != row["run_dir"], row)


def drop_runs_row(path: Path, run_dir: Path) -> None:
    """Remove a run folder's row (used by --overwrite)."""
    if path.exists():
        _rewrite_rows(path, lambda fields: fields.get("run_dir") != str(run_dir), None)


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

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
