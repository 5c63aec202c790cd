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
import time
import warnings
from pathlib import Path
from typing import Any

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
    "eval_train",
    "argv",
}
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


def append_runs_tsv(path: Path, row: dict[str, Any]) -> None:
    """Append one row under an exclusive file lock, so parallel runs never interleave lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tsv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            new = not path.exists() or path.stat().st_size == 0
            with open(path, "a") as handle:
                if new:
                    handle.write("\t".join(RUNS_COLUMNS) + "\n")
                values = [str(row.get(c, "")).replace("\t", " ").replace("\n", " ") for c in RUNS_COLUMNS]
                handle.write("\t".join(values) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
        try:
            self.wandb = wandb.init(
                project=project,
                name=name,
                group=group,
                tags=tags,
                config=config,
                mode=mode,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=True),
            )
        except Exception as error:  # noqa: BLE001
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
