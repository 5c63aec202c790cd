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
        for _ in range(10):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(
                    f"{self.run_dir} is being written by process {_holder_pid(self.path)} (a run of the same "
                    "settings); wait for it to end, or stop it, then start again (add --resume to continue it)"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the lock file we opened was removed by its last owner meanwhile: take the new one
        else:
            raise RunFolderBusy(f"{self.run_dir}: its lock file keeps changing; another process is starting it")
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


def legacy_folders(out_dir: Path) -> list[Path]:
    """Run folders under `out_dir` written before RunSpec (a record with an identity and no spec)."""
    found = []
    for config_file in sorted(Path(out_dir).glob("*/config.json")):
        try:
            record = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "identity" in record and record.get("spec", {}).get("version") != 2:
            found.append(config_file.parent)
    return found


_WARNED: set[Path] = set()  # folders this process already said it cannot migrate


def migrate_legacy(out_dir: Path) -> list[tuple[Path, Path]]:
    """Rename every legacy run folder under `out_dir` to its RunSpec name (runs.tsv row and record
    updated); returns the (old, new) pairs. Idempotent and safe to run from several processes at once:
    it works under one lock per out_dir, takes each folder's run lock while moving it (a folder held
    by a live run is skipped), and renames before it rewrites the record, so a kill in between leaves a
    folder the next pass finishes. A checkpoint re-saved after the run is not taken for the run's."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not legacy_folders(out_dir):
        return []
    moved = []
    with open(out_dir / ".migrate.lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one migrating process per out_dir; the others wait, then find none
        for folder in legacy_folders(out_dir):
            try:
                lock = RunLock(folder).acquire()
            except RunFolderBusy:
                continue  # a live run of this code holds it
            try:
                pair = _migrate_one(folder, out_dir)
            finally:
                lock.release()
            if pair is not None:
                moved.append(pair)
    return moved


def _warn_once(folder: Path, message: str) -> None:
    if folder not in _WARNED:
        _WARNED.add(folder)
        print(f"warning: {folder} was written by an older version; {message}; it is left as it is", file=sys.stderr)


def _migrate_one(folder: Path, out_dir: Path) -> tuple[Path, Path] | None:
    config_file = folder / "config.json"
    record = json.loads(config_file.read_text())
    try:
        spec = legacy_spec(record, out_dir)
    except (CheckpointError, KeyError, ValueError, TypeError) as error:
        _warn_once(folder, f"it cannot be mapped to its new name ({type(error).__name__}: {error})")
        return None
    source = Path(spec.checkpoint.source)
    if source.exists():
        newest = max((p.stat().st_mtime for p in source.iterdir() if p.is_file()), default=0.0)
        if newest > config_file.stat().st_mtime:
            _warn_once(folder, f"its checkpoint {source} was re-saved after the run, so it may not be the run's own")
            return None
    old_name = record.get("run") or folder.name  # the legacy name, also after a kill between rename and record
    target = folder.parent / spec.run_name()
    if target != folder:
        try:
            os.rename(folder, target)  # fails on an existing, non-empty target: never two runs in one folder
        except OSError:
            _warn_once(folder, f"its new name {target.name} is taken")
            return None
        (target / LOCK_NAME).unlink(missing_ok=True)  # the old folder's lock file moved with it
    record.update(
        spec=spec.to_json(),
        identity=spec.identity(),
        config_hash=spec.identity_hash(),
        run=target.name,
        migrated_from={"run": old_name, "config_hash": record.get("config_hash")},
    )
    atomic_write_json(target / "config.json", record)
    _migrate_row(out_dir / "runs.tsv", old_name, target, spec)
    return folder, target


def _migrate_row(path: Path, old_name: str, new: Path, spec: RunSpec) -> None:
    if not path.exists():
        return

    def update(fields: dict[str, str]) -> dict[str, str] | None:
        if Path(fields.get("run_dir", "")).name != old_name:
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
            lock.path.unlink()  # a process that opened it meanwhile sees its inode gone (RunLock.acquire)
            with contextlib.suppress(OSError):  # a new lock file appeared: that process owns the folder now
                run_dir.rmdir()
        lock.release()
