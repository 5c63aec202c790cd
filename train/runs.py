"""Run identity, the per-run log, wandb, and the `runs.tsv` summary (one row per run).

The run name is derived from the config (task, variant flags and key knobs, lr, seed), so ablation
runs never overwrite each other; it names the folder, the wandb run, its group (task) and tags.
"""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from model.config import GPT2Config

log = logging.getLogger(__name__)
RUNS_COLUMNS = ["run", "task", "variant", "seed", "lr", "fine_tune_mode", "trainable_params", "total_params",
                "metric", "best_value", "best_step", "dev_metrics", "train_seconds", "peak_memory_mb", "steps",
                "git_commit", "run_dir", "finished_at"]


def variant_tag(config: GPT2Config) -> str:
    parts = []
    if config.use_kan and config.use_lora:
        parts.append(f"kanlora-r{config.lora_r}-a{config.lora_alpha:g}-g{config.kan_grid_size}k{config.kan_spline_order}"
                     + ("-rs" if config.lora_rslora else ""))
    elif config.use_kan:
        parts.append(f"kan-{config.kan_init}-g{config.kan_grid_size}k{config.kan_spline_order}")
    elif config.use_lora:
        kind = "dora" if config.lora_dora else "rslora" if config.lora_rslora else "lora"
        parts.append(f"{kind}-r{config.lora_r}-a{config.lora_alpha:g}"
                     + (f"-{config.lora_init}" if config.lora_init != "default" else "")
                     + (f"-plus{config.lora_plus_ratio:g}" if config.lora_plus_ratio != 1.0 else ""))
    if config.use_kora:
        parts.append(f"kora-r{config.kora_r}-d{config.kora_d_comp}-{config.kora_target}")
    if config.use_graph:
        window = "all" if config.graph_window is None else config.graph_window
        parts.append(f"graph-h{config.graph_heads}-w{window}-{config.graph_backend}")
    if not parts:
        parts.append("base")
    mode = config.resolved_fine_tune_mode
    default_mode = "adapters" if config.any_variant else "full-model"
    if mode != default_mode:
        parts.append({"full-model": "full", "last-linear-layer": "lastlinear", "adapters": "adapters"}[mode])
    return "+".join(parts)


def run_name(task: str, config: GPT2Config, lr: float, seed: int) -> str:
    return f"{task}-{variant_tag(config)}-lr{lr:g}-s{seed}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
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

    def __init__(self, run_dir: Path, name: str, group: str, tags: list[str], config: dict, mode: str,
                 project: str, enabled: bool = True) -> None:
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
            self.wandb = wandb.init(project=project, name=name, group=group, tags=tags, config=config, mode=mode,
                                    dir=str(run_dir), id=name.replace("+", "_")[:120], resume="allow",
                                    settings=wandb.Settings(silent=True))
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
