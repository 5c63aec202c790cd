"""A grid's learning-rate tuning stage: each method at its own best rate, chosen on dev.

A preset's `[tune]` table turns it on (experiments/ablate.py runs the stage before the final runs):

    [tune]
    lr = "prior"      # or a list of candidates, e.g. [1e-4, 3e-4, 1e-3]
    points = 5        # "prior": this many log-spaced rates over each method's own prior range
    seed = 0          # the tuning runs' seed
    epochs = 1        # the tuning budget per candidate (or max_steps = N)

The protocol. For every (variant, task) cell whose flags do not fix `--lr`, one tuning run per candidate
rate is trained at the tuning budget with the tuning seed. Tuning runs score dev only: they run with
`--no-predict_test`, so the test split is never read. The cell's rate is the candidate with the best
dev score (the best checkpoint's `best_value`). Then the preset's seeds train at the full budget with
that rate, each recording the tuning runs that chose it (`--lr_chosen_by`).

A candidate that diverged (exit 3, diverged.json) is a finished trial that scores below every other; so is
a finished run whose metrics.json cannot be read (named in tuning.json and the report). Ties go to the
(lower) middle of the tied candidates, so a flat curve picks no extreme. A cell where every candidate
diverged gets no rate and no final runs (ablate exits 1, and stages that need it wait). The choice is marked
`edge` when the best score is reached at the first or last candidate (the range should be widened),
and `flat` when every candidate scored the same.

Each method declares its prior range where it is registered (modules/variant.py `LrPrior`: our variants
in their files, the peft methods in modules/peft_methods.py `METHODS`, each record's `lr` with its source). A run
that trains more than adapters searches its fine-tune mode's range (train/base/settings.py `MODE_LR_PRIORS`).
When several variants are enabled at once (LoRA-KAN), the range is the hull of their ranges.

Everything here is a pure function of the run folders, so an interrupted stage picks up where it
stopped and a re-run recomputes the same choice. `tuning.json` in the grid folder records the choice
for the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.inputs import InputError
from model.files import atomic_write_text, read_json_object
from train.run.log import log_entries

TUNE_KEYS = {"lr", "points", "seed", "epochs", "max_steps"}
TUNING_FILE = "tuning.json"


@dataclass(frozen=True)
class TuneSettings:
    """A preset's [tune] table, validated."""

    lr: str | tuple[float, ...] = "prior"
    points: int = 5
    seed: int = 0  # outside the presets' seeds: tuning and final runs never share a data order
    epochs: int | None = 1
    max_steps: int | None = None

    def budget_flags(self) -> list[str]:
        """The flags that set a tuning run's budget (after the preset's own, so they win)."""
        flags = ["--epochs", str(self.epochs)] if self.epochs is not None else []
        return flags + (["--max_steps", str(self.max_steps)] if self.max_steps is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr if isinstance(self.lr, str) else list(self.lr),
            "points": self.points if isinstance(self.lr, str) else None,
            "seed": self.seed,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
        }


def tune_settings(path: Path, table: Any) -> TuneSettings:
    """The [tune] table of preset `path`; InputError naming the key that is wrong."""

    def bad(message: str) -> InputError:
        return InputError(f"error: {path}: [tune] {message}")

    if not isinstance(table, dict):
        raise bad("must be a table (lines `key = value` under [tune])")
    unknown = sorted(set(table) - TUNE_KEYS)
    if unknown:
        raise bad(f"has no key(s) {unknown} (known: {sorted(TUNE_KEYS)})")

    def whole(key: str, default: int | None, low: int) -> int | None:
        value = table.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise bad(f"{key} must be a whole number >= {low}, got {value!r}")
        return value

    lr = table.get("lr", "prior")
    if isinstance(lr, list):
        if len(lr) < 2 or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < math.inf for x in lr
        ):
            raise bad(f"lr must list at least two learning rates > 0, got {lr!r}")
        if len(set(lr)) != len(lr):
            raise bad(f"lr lists a rate twice: {lr!r}")
        lr = tuple(sorted(float(x) for x in lr))
    elif lr != "prior":
        raise bad(f'lr must be "prior" (each method\'s own range) or a list of rates, got {lr!r}')
    if "points" in table and not isinstance(lr, str):
        raise bad('points applies to lr = "prior" only (a list of rates is the grid itself)')
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad(f"seed must be a whole number, got {seed!r}")
    max_steps = whole("max_steps", None, 1)
    epochs = whole("epochs", None if max_steps is not None else 1, 1)
    return TuneSettings(lr=lr, points=whole("points", 5, 2), seed=seed, epochs=epochs, max_steps=max_steps)


# ---------------------------------------------------------------- the priors


def config_prior(config: Any) -> Any:
    """The learning-rate range a run of this (resolved) model config searches: its fine-tune mode's range
    when it trains more than adapters, else its enabled variants' (their hull when there are several)."""
    from modules.registry import enabled_variants
    from modules.variant import LrPrior
    from train.base.settings import MODE_LR_PRIORS

    mode = config.resolved_fine_tune_mode
    if mode != "adapters":
        return LrPrior(*MODE_LR_PRIORS[mode])
    priors = [(variant.name, variant.prior(config)) for variant in enabled_variants(config)]
    if len(priors) == 1:
        return priors[0][1]
    return LrPrior(
        min(p.low for _, p in priors),
        max(p.high for _, p in priors),
        "the hull of " + "; ".join(f"{name}'s [{p.low:g}, {p.high:g}] ({p.source})" for name, p in priors),
    )


def candidates(settings: TuneSettings, prior: Any) -> list[float]:
    """The rates a cell tries: the preset's list, or `points` log-spaced rates over the prior, rounded to
    three significant digits (readable run names; the ends stay exact)."""
    if not isinstance(settings.lr, str):
        return list(settings.lr)
    ratio = prior.high / prior.low
    if ratio == 1:
        return [prior.low]
    steps = settings.points - 1
    return [float(f"{prior.low * ratio ** (i / steps):.3g}") for i in range(settings.points)]


# ---------------------------------------------------------------- trials and the choice


@dataclass
class Trial:
    """One candidate rate of a cell and what its tuning run's folder says."""

    lr: float
    run_dir: Path
    outcome: str = "pending"  # finished, diverged, unreadable (finished, but its metrics.json is not ours) or pending
    dev: float | None = None  # the best dev metric (finished runs)
    steps: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "run": self.run_dir.name,
            "run_dir": str(self.run_dir),
            "outcome": self.outcome,
            "dev": self.dev,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
        }


def read_trial(lr: float, run_dir: Path) -> Trial:
    """A tuning run's outcome from its folder: metrics.json (finished: the best dev metric, its steps and
    training time) or diverged.json (diverged: its steps, the time its log spans); else pending. Only
    dev numbers are read: a tuning run has no test predictions."""
    trial = Trial(lr, run_dir)
    if (run_dir / "metrics.json").is_file():
        try:
            metrics = read_json_object(run_dir / "metrics.json", ("best_value", "steps", "train_seconds"))
            dev = float(metrics["best_value"])
            trial.steps, trial.seconds = int(metrics["steps"]), float(metrics["train_seconds"])
        except (OSError, TypeError, ValueError):  # (UnreadableFile is a ValueError)
            dev = math.nan
        # A finished run whose record is damaged scores nothing; it is not re-run (the folder is the record:
        # delete it to run the candidate again). The report names it.
        trial.outcome, trial.dev = ("finished", dev) if math.isfinite(dev) else ("unreadable", None)
        return trial
    try:
        diverged = read_json_object(run_dir / "diverged.json")
    except (OSError, ValueError):
        return trial  # no verdict yet
    trial.outcome = "diverged"
    step = diverged.get("step")
    trial.steps = step if isinstance(step, int) and step >= 0 else 0
    # a diverged run records no training time of its own: the time its log spans
    times = [json.loads(line).get("time") for line, _ in log_entries(run_dir / "log.jsonl")]
    times = [t for t in times if isinstance(t, int | float)]
    trial.seconds = max(times) - min(times) if len(times) > 1 else 0.0
    return trial


@dataclass
class Choice:
    """A cell's chosen rate: the best dev score among its finished trials."""

    lr: float
    best: float
    edge: str | None  # "low" / "high": the best score is reached at an end of the candidates
    flat: bool  # every finished candidate scored the same
    chosen_by: list[str] = field(default_factory=list)  # the tuning runs' folder names


def choose(trials: list[Trial]) -> Choice | None:
    """The best dev score; None while a trial is pending or when none finished (every one diverged).
    Ties go to the middle of the tied candidates; `edge` marks a best score reached at an end."""
    if any(t.outcome == "pending" for t in trials):
        return None
    scored = [(i, t) for i, t in enumerate(trials) if t.outcome == "finished"]
    if not scored:
        return None
    best = max(t.dev for _, t in scored)
    tied = [i for i, t in scored if t.dev == best]
    pick = tied[(len(tied) - 1) // 2]
    flat = len(tied) == len(trials) and len(trials) > 1
    edge = None
    if not flat and len(trials) > 1:
        edge = "low" if 0 in tied else "high" if len(trials) - 1 in tied else None
    return Choice(trials[pick].lr, best, edge, flat, [t.run_dir.name for t in trials])


# ---------------------------------------------------------------- the record


def write_record(out_dir: Path, settings: TuneSettings, cells: list[dict[str, Any]]) -> None:
    """tuning.json: the settings and, per cell, its prior, trials and choice (what the report shows)."""
    record = {"settings": settings.to_dict(), "cells": cells}
    atomic_write_text(out_dir / TUNING_FILE, json.dumps(record, indent=2) + "\n")


def cell_record(variant: str, task: str, prior: Any, trials: list[Trial], choice: Choice | None) -> dict[str, Any]:
    return {
        "variant": variant,
        "task": task,
        "prior": None if prior is None else {"low": prior.low, "high": prior.high, "source": prior.source},
        "trials": [t.to_dict() for t in trials],
        "chosen_lr": choice.lr if choice else None,
        "best_dev": choice.best if choice else None,
        "edge": choice.edge if choice else None,
        "flat": choice.flat if choice else False,
        "status": "chosen" if choice else _unchosen(trials),
    }


def _unchosen(trials: list[Trial]) -> str:
    if any(t.outcome == "pending" for t in trials):
        return "pending"
    if any(t.outcome == "unreadable" for t in trials):
        return "no readable trial: delete the unreadable tuning run folders and re-run"
    return "all diverged"
