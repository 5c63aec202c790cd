"""The run folder and its owner: where a spec's folder is, who may write it, its record, and its
`runs.tsv` row.

- **One writer.** `RunLock` holds an exclusive `flock` on `<run folder>/.lock` for the run's whole life
  (the lock file holds the owner's PID). A second process on the same folder stops at once (exit 2)
  naming that PID; a lock left by a dead process is taken over (the kernel drops a dead process's
  flock), so a SIGKILL never wedges a folder. `lock_holder` asks without taking it (ablate does).
- **Legacy folders.** Folders written before `RunSpec` (their config.json has no `spec`) named their
  run by a hash of `vars(args)` that included the `--model` string. `run_folder` migrates them on
  first sight: their recorded settings are read back into a `RunSpec`, the checkpoint they name is
  fingerprinted by content, and the folder is renamed to its new name with its record and `runs.tsv`
  row updated. A folder whose checkpoint cannot be found any more is left as it is, with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from model.config import GPT2Config
from model.files import atomic_write_json
from model.fingerprint import checkpoint_identity
from model.loading import CheckpointError
from train.lifecycle import RunFolderError
from train.runs import rewrite_runs_rows
from train.settings import MultitaskSettings, OutputSettings, RuntimeSettings, TrainingSettings
from train.spec import Checkpoint, RunSpec
from train.tasks import TASKS

LOCK_NAME = ".lock"


class RunFolderBusy(RunFolderError):
    """Another live process holds the run folder's lock."""


# ---------------------------------------------------------------- the lock


def _holder_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class RunLock:
    """Exclusive ownership of a run folder for as long as the run lives (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(
                f"{self.run_dir} is being written by process {_holder_pid(self.path)} (a run of the same settings); "
                "wait for it to end, or stop it, then start again (add --resume to continue it)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_dir: Path) -> str | None:
    """The PID holding `run_dir`'s lock, or None when no live process holds it (the lock is not taken)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_pid(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- where a spec's folder is


def run_folder(spec: RunSpec) -> Path:
    """`<out_dir>/<run name>`; legacy folders under out_dir are migrated first, so a run made before
    RunSpec is found under its new name."""
    out_dir = Path(spec.output.out_dir)
    path = out_dir / spec.run_name()
    if not path.exists():
        migrate_legacy(out_dir)
    return path


def new_wandb_id(spec: RunSpec) -> str:
    """The configuration's hash, the seed and a random suffix drawn when the folder is created (kept in
    config.json, so a resumed run continues the same wandb run and runs in two out dirs never merge)."""
    return f"{spec.identity_hash()}-s{spec.seed}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------- legacy folders


def _legacy_tasks(label: str, training: dict[str, Any]) -> list[str]:
    if label.startswith("multitask-"):
        return list(training["tasks"])
    if "-to-" in label:
        return [label.split("-to-", 1)[1]]
    return [label]


def _pick(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def legacy_spec(record: dict[str, Any], out_dir: Path) -> RunSpec:
    """The RunSpec of a run folder written before RunSpec (SPEC_VERSION 1), from its config.json.
    Raises CheckpointError when the checkpoint it names cannot be read any more."""
    identity, args = record["identity"], record["training"]
    label = identity["task"]
    settings = identity["training"]
    tasks = _legacy_tasks(label, args)
    model = str(settings["model"])
    task_settings = {n: _pick(TASKS[n].settings, settings) for n in tasks if TASKS[n].settings is not None}
    if label.startswith("multitask-"):
        task_settings["multitask"] = _pick(MultitaskSettings, settings)
    return RunSpec(
        label=label,
        tasks=tuple(tasks),
        config=GPT2Config.from_dict({**identity["config"], "name": model}),
        checkpoint=Checkpoint(model, checkpoint_identity(model)),
        training=_pick(TrainingSettings, {**settings, "seed": args["seed"]}),
        task_settings=task_settings,
        output=_pick(OutputSettings, {**args, "out_dir": str(out_dir), "resume": False, "overwrite": False}),
        runtime=_pick(RuntimeSettings, args),
        transfer_from=settings.get("transfer_from"),
        argv=tuple(record.get("command") or ()),
    )


def migrate_legacy(out_dir: Path) -> list[tuple[Path, Path]]:
    """Rename every legacy run folder under `out_dir` to its RunSpec name (record and runs.tsv row
    updated); returns the (old, new) pairs. Idempotent; a folder held by a live process is skipped."""
    moved = []
    for config_file in sorted(Path(out_dir).glob("*/config.json")):
        folder = config_file.parent
        try:
            record = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or "spec" in record or "identity" not in record or lock_holder(folder):
            continue
        try:
            spec = legacy_spec(record, Path(out_dir))
        except (CheckpointError, KeyError, ValueError, TypeError) as error:
            print(
                f"warning: {folder} was written by an older version and cannot be mapped to its new name "
                f"({type(error).__name__}: {error}); it is left as it is",
                file=sys.stderr,
            )
            continue
        target = folder.parent / spec.run_name()
        if target.exists() and target != folder:
            print(f"warning: {folder}: its new name {target.name} is taken; left as it is", file=sys.stderr)
            continue
        record.update(
            spec=spec.to_json(),
            identity=spec.identity(),
            config_hash=spec.identity_hash(),
            run=target.name,
            migrated_from={"run": folder.name, "config_hash": record.get("config_hash")},
        )
        atomic_write_json(config_file, record)
        if target != folder:
            os.replace(folder, target)
        _migrate_row(Path(out_dir) / "runs.tsv", folder, target, spec)
        moved.append((folder, target))
    return moved


def _migrate_row(path: Path, old: Path, new: Path, spec: RunSpec) -> None:
    if not path.exists():
        return

    def update(fields: dict[str, str]) -> dict[str, str] | None:
        if Path(fields.get("run_dir", "")).name != old.name:
            return fields
        return {**fields, "run": new.name, "run_dir": str(new), "config_hash": spec.identity_hash()}

    rewrite_runs_rows(path, update)


@contextlib.contextmanager
def owned(run_dir: Path, main_process: bool = True):
    """The run folder's lock for the block (torchrun ranks other than 0 never write, so never lock)."""
    if not main_process:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        if [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:  # nothing was written: leave no empty folder
            lock.path.unlink()
            run_dir.rmdir()
        lock.release()
