"""The run folder and its owner: where a spec's folder is, who may write it, its states and the rules
for starting or resuming it, how it finishes (metrics.json and its `runs.tsv` row).

States of `<out_dir>/<run name>/`:
* new          nothing there yet;
* dead         started, but stopped before its first checkpoint (config.json / log.jsonl only);
* interrupted  has a `last` checkpoint and no metrics.json (killed, preempted, Ctrl-C);
* finished     metrics.json written (its runs.tsv row exists).
A fresh start refuses any state but `new` unless `--overwrite` (which clears the folder and its
runs.tsv row first); `--resume` continues `interrupted`, restarts `dead` from step 0, and does
nothing for `finished` (unless `--extend_epochs N`).

The folder's lock is train/run/lock.py's, its state as its files show it train/run/state.py's, its log
train/run/log.py's and its runs.tsv row train/run/index.py's; folders written by older versions are renamed
by train/run/legacy.py before a run looks for its folder.
"""

from __future__ import annotations

import contextlib
import json
import resource
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from model.files import UnreadableFile, atomic_write_json, read_json_object
from train.run import checkpoint as ckpt
from train.run.index import drop_runs_row, row_from_folder, update_index, write_runs_row
from train.run.legacy import migrate_legacy
from train.run.lock import LOCK_NAME, RunLock
from train.run.log import log_entries
from train.run.spec import RunSpec, flat_identity
from train.run.state import RunFolderError, saved_checkpoints


def logged_steps(run_dir: Path) -> int:
    """The last step log.jsonl reached (0 when none)."""
    return max((step for _, step in log_entries(run_dir / "log.jsonl")), default=0)


# config.json's fields that readers use, with the type each must have (RECORD_TYPES)
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "identity": (dict,),
    "training": (dict,),
    "config": (dict,),
    "parameters": (dict,),
    "run": (str,),
    "wandb_id": (str,),
    "extra_epochs": (int, type(None)),
}


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        record = read_json_object(path)
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} has no config.json; it is not a run folder of this code") from None
    except UnreadableFile as error:
        raise RunFolderError(f"{error}; pass --overwrite to start the run again") from None
    for field, types in RECORD_TYPES.items():  # parseable is not yet right: each field a reader uses
        value = record.get(field)
        if field in record and (not isinstance(value, types) or isinstance(value, bool)):
            expected = " or ".join("null" if t is type(None) else {dict: "an object"}.get(t, t.__name__) for t in types)
            raise RunFolderError(
                f"{path}: {field} must be {expected}, not {json.dumps(value)[:80]}; pass --overwrite to start the run "
                "again"
            )
    return record


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics.json; a damaged one is a RunFolderError that says how to finish it again."""
    try:
        return read_json_object(run_dir / "metrics.json")
    except UnreadableFile as error:
        raise RunFolderError(
            f"{error}; the run's checkpoints are intact: delete that file and --resume to finish the run again"
        ) from None


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'--flag: run value -> value now' for every result-changing setting that differs."""
    # compared as stored in config.json (JSON: tuples become lists)
    a, b = (json.loads(json.dumps(flat_identity(x), default=str)) for x in (saved, now))
    return [
        f"--{k}: {a.get(k)!r} in the run, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def closest_run(out_dir: Path, identity: dict[str, Any], seed: int) -> tuple[Path, list[str]] | None:
    """The run folder under `out_dir` (same task and seed) whose settings differ least from `identity`."""
    best = None
    for config_file in sorted(out_dir.glob("*/config.json")):
        try:
            record = json.loads(config_file.read_text())
        except ValueError:
            continue
        saved = record.get("identity")
        if not saved or saved.get("label") != identity["label"] or record.get("training", {}).get("seed") != seed:
            continue
        diffs = differences(saved, identity)
        if best is None or len(diffs) < len(best[1]):
            best = (config_file.parent, diffs)
    return best


def clear_run_folder(run_dir: Path) -> None:
    """What --overwrite removes: every file the run wrote (logs, checkpoints, predictions, wandb); the
    lock file stays, since this process holds it (train/run/folder.py)."""
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name == ".lock":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def refuse_fresh_start(run_dir: Path, state: str) -> RunFolderError:
    if state == "finished":
        metrics = read_metrics(run_dir)
        return RunFolderError(
            f"{run_dir} holds a finished run (selection score {metrics.get('selection_score')} at step "
            f"{metrics.get('best_step')}); pass --overwrite to train it again, or --resume --extend_epochs N "
            f"to train it further"
        )
    if state == "interrupted":
        try:
            step = read_json_object(run_dir / "checkpoints" / "last.json").get("step")
        except (UnreadableFile, FileNotFoundError):  # a lost or damaged pointer: the newest complete folder says it
            saved = saved_checkpoints(run_dir / "checkpoints", "last")
            step = int(saved[-1].name.split("-")[1].split(".")[0]) if saved else "unknown: its pointer is corrupt"
        return RunFolderError(
            f"{run_dir} holds an interrupted run (last checkpoint at step {step}); pass --resume to continue "
            f"it or --overwrite to start it again"
        )
    return RunFolderError(
        f"{run_dir} holds a run that stopped at step {logged_steps(run_dir)} before its first checkpoint; "
        f"pass --resume (or --overwrite) to start it again from step 0"
    )


def check_run_folder(run_dir: Path, state: str, spec: Any, main_process: bool, existed: bool = True) -> dict | None:
    """Enforce the start/resume rules (module docstring); returns the saved record of a run that is
    resumed, None for a fresh start (after --overwrite cleared the folder)."""
    out, identity = spec.output, spec.identity()
    if out.extend_epochs and spec.training.max_steps:
        raise RunFolderError("--extend_epochs cannot extend a run limited by --max_steps")
    if out.resume:
        if state == "new" and existed:  # (`existed`: before this process took the folder's lock)
            # the folder was made but nothing was saved in it (a full disk while it was created): the
            # "free space and --resume" advice starts it from step 0
            if main_process:
                print(f"{run_dir} holds nothing to resume yet; starting it from step 0", file=sys.stderr)
            return None
        if state == "new":
            closest = closest_run(Path(out.out_dir), identity, spec.seed)
            if closest is not None and closest[1]:
                folder, diffs = closest
                raise RunFolderError(
                    f"--resume: no run with these settings in {out.out_dir} ({run_dir.name}); the closest, "
                    f"{folder.name}, differs in: " + "; ".join(diffs)
                )
            raise RunFolderError(f"--resume: no run {run_dir.name} in {out.out_dir} to resume")
        saved = read_record(run_dir)
        if "identity" in saved and (diffs := differences(saved["identity"], identity)):
            raise RunFolderError(f"--resume: {run_dir} was run with other settings: " + "; ".join(diffs))
        if out.extend_epochs and state == "interrupted":
            # an extension is recorded when it starts (config.json's extra_epochs); extending an unfinished
            # run again would add to it twice
            raise RunFolderError(
                f"--extend_epochs: {run_dir} has not finished (it stopped at a checkpoint, after "
                f"{saved.get('extra_epochs') or 0} extra epoch(s) were asked for); plain --resume finishes it, "
                "then --resume --extend_epochs N trains it further"
            )
        if state == "dead":  # nothing to continue: start again from step 0 with a clean folder
            if main_process:
                print(
                    f"{run_dir} stopped at step {logged_steps(run_dir)} before its first checkpoint; "
                    f"starting it again from step 0",
                    file=sys.stderr,
                )
                clear_run_folder(run_dir)
            return None
        ckpt.checkpoint_folder(run_dir / "checkpoints", "last")  # a corrupt pointer fails here, before any loading
        return saved
    if state != "new":
        if not out.overwrite:
            raise refuse_fresh_start(run_dir, state)
        if main_process:
            clear_run_folder(run_dir)
            drop_runs_row(run_dir.parent, run_dir)
    return None


def diverged_note(run_dir: Path) -> str | None:
    path = run_dir / "diverged.json"
    if not path.exists():
        return None
    try:
        info = read_json_object(path)
    except UnreadableFile as error:
        return f"note: this run diverged before ({error})"
    return (
        f"note: this run diverged before ({info.get('reason')} at step {info.get('step')}, task "
        f"{info.get('task')}); it resumes from its last healthy checkpoint, and with the same settings it "
        f"will likely diverge again (lower --lr, raise --warmup, or lower --max_grad_norm in a new run)"
    )


# ---------------------------------------------------------------- where a spec's folder is


def run_folder(spec: RunSpec, migrate: bool = True) -> Path:
    """`<out_dir>/<run name>`. With `migrate` (a run that is about to start), legacy folders under out_dir
    are migrated first (once per process and folder), so a run made before RunSpec is found under its
    new name. Planning (`migrate=False`) never renames or writes anything."""
    out_dir = Path(spec.output.out_dir)
    path = out_dir / spec.run_name()
    if migrate and not path.exists():
        migrate_legacy(out_dir)
    return path


def new_wandb_id(spec: RunSpec) -> str:
    """The configuration's hash, the seed and a random suffix drawn when the folder is created (kept in
    config.json, so a resumed run continues the same wandb run and runs in two out dirs never merge)."""
    return f"{spec.identity_hash()}-s{spec.seed}-{secrets.token_hex(3)}"


HELD: list[Path] = []  # the run folders this process holds now (what a second Ctrl-C stops)


@contextlib.contextmanager
def owned(run_dir: Path, main_process: bool = True):
    """The run folder's lock for the block (torchrun ranks other than 0 never write, so never lock)."""
    if not main_process:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    HELD.append(run_dir)
    try:
        yield lock
    finally:
        HELD.remove(run_dir)
        if [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:  # nothing was written: leave no empty folder
            lock.path.unlink()  # a process that opened it meanwhile sees its inode gone (RunLock.acquire)
            with contextlib.suppress(OSError):  # a new lock file appeared: that process owns the folder now
                run_dir.rmdir()
        lock.release()


# ---------------------------------------------------------------- finishing


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finish_run(run_dir: Path, spec: RunSpec, record, progress, best, device, objectives, extra) -> dict:
    """metrics.json, then the run's runs.tsv row (where the folder is now, wherever it was made)."""
    single = len(objectives) == 1
    prefixed = {
        n: {**m, "predictions": {k: f"predictions/{v}" for k, v in m["predictions"].items()}}
        if "predictions" in m
        else m
        for n, m in best.items()
    }
    metrics: dict[str, Any] = dict(next(iter(prefixed.values()))) if single else {"tasks": prefixed}
    metrics.update(
        selection_score=progress.best,
        best_step=progress.best_step,
        steps=progress.step,
        train_seconds=round(progress.train_seconds, 3),
        peak_memory_mb=round(_peak_memory_mb(device), 1),
        **extra,
    )
    primary = next(iter(objectives.values())).metric if single else "selection_score"
    metrics.update(metric=primary, best_value=metrics.get(primary, progress.best))
    atomic_write_json(run_dir / "metrics.json", metrics)
    # A kill from here on leaves a finished folder without its row: whoever syncs the index next adds it.
    write_runs_row(run_dir.parent, row_from_folder(run_dir))
    return metrics


def sync_index(run_dir: Path) -> None:
    """Make sure the grid folder's runs.tsv has every finished run's row (a run killed after its
    metrics.json lacks one); used when --resume finds a finished run."""
    update_index(run_dir.parent)
