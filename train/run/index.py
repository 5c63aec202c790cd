"""`runs.tsv`: an index of a grid's finished runs, one row each, that can always be rebuilt.

The run folders are the record; `runs.tsv` is a convenience built from them. A row is a pure function
of its folder's `config.json` and `metrics.json` (`row_from_folder`), so:
* a run killed between writing `metrics.json` and its row gets the row from whoever looks next:
  `sync_index` runs when a run finishes, when `--resume` finds a finished run, in `ablate.py` and in
  `report.py`, and adds every finished folder's missing row;
* a damaged file (a header that is not ours, a row with the wrong number of fields, bytes that are
  not UTF-8) is moved aside to `runs.tsv.damaged-<time>` and rebuilt from the folders, with one
  warning line; it is never extended;
* a row is keyed by the run's identity (task, `config_hash`, seed), not its folder's path, so a
  moved or copied run that is resumed has one row, not two.
Rows whose folder is gone (a grid folder trimmed by hand) are kept: the index remembers them.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from model.config import GPT2Config
from model.files import atomic_write_text
from train.run.spec import variant_tag

INDEX_NAME = "runs.tsv"
RUNS_COLUMNS = [
    "run",
    "task",
    "variant",
    "label",
    "stage",
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
KEY = ("task", "config_hash", "seed")
# metrics.json keys that are the run's bookkeeping, not a task's dev metrics
BOOKKEEPING = {
    "selection_score",
    "best_step",
    "steps",
    "train_seconds",
    "eval_seconds",
    "test_seconds",
    "test_predictions_step",
    "peak_memory_mb",
    "metric",
    "best_value",
    "dev_metrics",
    "source",
    "zero_shot",
    "transfer",
    "tasks",
}


class IndexDamaged(ValueError):
    """runs.tsv cannot be read as this code's index; the message says where."""


# ---------------------------------------------------------------- a row from a folder


def dev_metrics(record: dict[str, Any], metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: its best dev metrics} (predictions paths left out) from a folder's record and metrics."""
    if "dev_metrics" in metrics:
        return metrics["dev_metrics"]
    if "tasks" in metrics:  # multitask
        per_task = metrics["tasks"]
    else:
        tasks = record.get("spec", {}).get("tasks") or record.get("training", {}).get("tasks") or [record["task"]]
        per_task = {tasks[-1]: {k: v for k, v in metrics.items() if k not in BOOKKEEPING}}
    return {n: {k: v for k, v in m.items() if k != "predictions"} for n, m in per_task.items()}


def runs_row(run_dir: Path, record: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """A finished run's row, from its config.json (`record`) and metrics.json alone."""
    config = GPT2Config.from_dict(record["config"])
    training = record["training"]
    dev = dev_metrics(record, metrics)
    generation = [m["generation_seconds"] for m in dev.values() if "generation_seconds" in m]
    finished = (run_dir / "metrics.json").stat().st_mtime
    return {
        "run": run_dir.name,
        "task": record["task"],
        "variant": variant_tag(config),
        "label": record.get("label") or variant_tag(config),
        "stage": training.get("stage") or "",  # a grid's [tune] stage: tune (an lr trial) or final
        "config_hash": record["config_hash"],
        "seed": training["seed"],
        "lr": training["lr"],
        "fine_tune_mode": config.resolved_fine_tune_mode,
        "trainable_params": record["parameters"]["trainable"],
        "total_params": record["parameters"]["total"],
        "metric": metrics["metric"],
        "best_value": metrics["best_value"],
        "best_step": metrics["best_step"],
        "dev_metrics": json.dumps(dev),
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "seconds_per_step": round(metrics["train_seconds"] / max(1, metrics["steps"]), 6),
        "generation_seconds": round(sum(generation), 3) if generation else "",
        "peak_memory_mb": metrics["peak_memory_mb"],
        "git_commit": record["git_commit"],
        "run_dir": str(run_dir),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
    }


def _read_finished(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finished folder's config.json and metrics.json; ValueError naming the file that cannot be read."""
    values = []
    for name in ("config.json", "metrics.json"):
        path = run_dir / name
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path} is not a JSON object")
        values.append(value)
    return values[0], values[1]


def _lacks(run_dir: Path, error: Exception) -> ValueError:
    return ValueError(f"{run_dir}: its config.json or metrics.json lacks {error}")


def row_from_folder(run_dir: Path) -> dict[str, Any]:
    """The row of a finished run folder; ValueError (naming the file) when its record cannot give one."""
    record, metrics = _read_finished(run_dir)
    try:
        return runs_row(run_dir, record, metrics)
    except (KeyError, TypeError, ValueError) as error:
        raise _lacks(run_dir, error) from None


def _row_key(run_dir: Path, record: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The fields that find a folder's row and say whether it is current (`same_run`, `_agrees`): read
    from the record without building its config, as a sync over a whole grid does for every folder."""
    try:
        return {
            "task": record["task"],
            "config_hash": record["config_hash"],
            "seed": record["training"]["seed"],
            "run_dir": str(run_dir),
            **{k: metrics[k] for k in ("best_value", "steps", "best_step")},
        }
    except (KeyError, TypeError) as error:
        raise _lacks(run_dir, error) from None


def finished_folders(out_dir: Path) -> list[Path]:
    return sorted(path.parent for path in Path(out_dir).glob("*/metrics.json"))


# ---------------------------------------------------------------- reading and writing the file


def locked(path: Path):
    """An exclusive lock beside `path`, so parallel runs never interleave or lose rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_suffix(".tsv.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def parse_index(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of runs.tsv; IndexDamaged names the first thing wrong. A file of an
    older version (a subset of today's columns) reads, its missing columns empty."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise IndexDamaged(f"{path} is not UTF-8 text ({error})") from None
    if not lines:
        raise IndexDamaged(f"{path} is empty")
    names = lines[0].split("\t")
    unknown = [n for n in names if n not in RUNS_COLUMNS]
    if unknown or len(set(names)) != len(names) or not set(KEY) | {"run_dir"} <= set(names):
        raise IndexDamaged(f"{path}:1: not a runs.tsv header")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise IndexDamaged(f"{path}:{number}: {len(fields)} fields, the header has {len(names)}")
        row = dict(zip(names, fields, strict=True))
        if not all(row[k] for k in (*KEY, "run_dir")):
            raise IndexDamaged(f"{path}:{number}: a row without its run's identity")
        rows.append(row)
    return names, rows


def same_run(fields: dict[str, Any], row: dict[str, Any]) -> bool:
    """One run: the same folder, or the same identity (task, configuration hash and seed) wherever it lies."""
    if str(fields.get("run_dir")) == str(row["run_dir"]):
        return True
    return all(str(fields.get(k)) == str(row[k]) for k in KEY)


def _row_line(names: list[str], row: dict[str, Any]) -> str:
    return "\t".join(str(row.get(c, "")).replace("\t", " ").replace("\n", " ") for c in names)


def _write(path: Path, names: list[str], rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "\n".join(["\t".join(names), *(_row_line(names, r) for r in rows)]) + "\n")


def _rebuild(path: Path, reason: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Move a damaged index aside; the caller adds the rows of the folders (sync)."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    print(f"warning: {reason}; it was moved to {aside.name} and is rebuilt from the run folders", file=sys.stderr)
    return list(RUNS_COLUMNS), []


def _read_or_rebuild(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    if not path.exists():
        return list(RUNS_COLUMNS), []
    try:
        names, rows = parse_index(path)
    except IndexDamaged as error:
        return _rebuild(path, str(error))
    return names + [c for c in RUNS_COLUMNS if c not in names], rows


def _add_missing(out_dir: Path, rows: list[dict[str, Any]]) -> int:
    """Add the row of every finished folder that has none, and refresh a row its folder disagrees with
    (a run extended since): the folders are the record. Returns how many rows changed."""
    changed = 0
    for folder in finished_folders(out_dir):
        try:
            record, metrics = _read_finished(folder)
            key = _row_key(folder, record, metrics)
            mine = [i for i, fields in enumerate(rows) if same_run(fields, key)]
            if len(mine) == 1 and _agrees(rows[mine[0]], key):
                continue  # current: the common case, decided without building the row
            try:
                row = runs_row(folder, record, metrics)
            except (KeyError, TypeError, ValueError) as error:
                raise _lacks(folder, error) from None
        except ValueError as error:
            print(f"warning: {error}; {folder.name} is left out of {INDEX_NAME}", file=sys.stderr)
            continue
        for i in reversed(mine):
            del rows[i]
        rows.append(row)
        changed += 1
    return changed


def _one_row_per_run(rows: list[dict[str, Any]]) -> None:
    """Keep the last row of each run (`same_run`): duplicates of a run whose folder is gone (a copied or
    merged runs.tsv) would otherwise be counted once per copy."""
    dirs: set[str] = set()
    keys: set[tuple[str, ...]] = set()
    kept = []
    for row in reversed(rows):
        key = tuple(str(row.get(k)) for k in KEY)
        if str(row.get("run_dir")) in dirs or key in keys:
            continue
        dirs.add(str(row.get("run_dir")))
        keys.add(key)
        kept.append(row)
    rows[:] = kept[::-1]


def _agrees(fields: dict[str, Any], row: dict[str, Any]) -> bool:
    return all(str(fields.get(k)) == str(row[k]) for k in ("run_dir", "best_value", "steps", "best_step"))


def update_index(out_dir: Path, change=None) -> list[dict[str, Any]]:
    """Under the index's lock: read runs.tsv (rebuilding a damaged one), apply `change(rows)` (which may
    edit the list in place), make sure every finished folder under `out_dir` has exactly one current
    row, and write the file if anything changed. Returns the rows."""
    path = Path(out_dir) / INDEX_NAME
    with locked(path):
        existed = path.exists()
        names, rows = _read_or_rebuild(path)
        before = [dict(r) for r in rows]
        if change is not None:
            change(rows)
        _add_missing(Path(out_dir), rows)
        _one_row_per_run(rows)
        if rows != before or not path.exists() and (existed or rows):
            _write(path, names, rows)
        return rows


def read_index(out_dir: Path) -> list[dict[str, Any]]:
    """The rows of a grid folder, synced with its run folders (repairing runs.tsv where it may write;
    a read-only grid is read from its folders without writing)."""
    try:
        return update_index(out_dir)
    except PermissionError:
        path = Path(out_dir) / INDEX_NAME
        try:
            rows = parse_index(path)[1] if path.exists() else []
        except IndexDamaged:
            rows = []
        _add_missing(Path(out_dir), rows)
        return rows


def write_runs_row(out_dir: Path, row: dict[str, Any]) -> None:
    """Add a finished run's row, replacing any earlier row of the same run: a run never has two."""

    def change(rows: list[dict[str, Any]]) -> None:
        rows[:] = [fields for fields in rows if not same_run(fields, row)] + [row]

    update_index(out_dir, change)


def drop_runs_row(out_dir: Path, run_dir: Path) -> None:
    """Remove a run folder's row (used by --overwrite, after the folder was cleared)."""
    if (Path(out_dir) / INDEX_NAME).exists():
        update_index(
            out_dir, lambda rows: rows.__setitem__(slice(None), [r for r in rows if r["run_dir"] != str(run_dir)])
        )


def rename_row(out_dir: Path, old_name: str, new_dir: Path, config_hash: str) -> None:
    """A legacy folder migrated to its new name: its row follows it."""

    def change(rows: list[dict[str, Any]]) -> None:
        for fields in rows:
            if Path(fields.get("run_dir", "")).name == old_name:
                fields.update(run=new_dir.name, run_dir=str(new_dir), config_hash=config_hash)

    if (Path(out_dir) / INDEX_NAME).exists():
        update_index(out_dir, change)
