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
import resource
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from model.config import GPT2Config
from model.files import UnreadableFile, atomic_write_json, read_json_object
from model.fingerprint import checkpoint_identity
from model.loading import CheckpointError
from train import checkpoint as ckpt
from train.index import drop_runs_row, rename_row, row_from_folder, update_index, write_runs_row
from train.runs import log_entries, saved_checkpoints
from train.settings import MultitaskSettings, OutputSettings, RuntimeSettings, TrainingSettings
from train.spec import SPEC_VERSION, Checkpoint, RunSpec, flat_identity, identity_schema
from train.tasks import TASKS
from train.tasks.base import settings_classes

LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run folder that cannot be started or resumed as asked; the message says what to pass."""


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
    lock file stays, since this process holds it (train/run.py)."""
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
    """Run folders under `out_dir` that may not carry today's name: written before RunSpec (a record
    with an identity and no spec), or named under another settings schema (a field added since)."""
    found = []
    for config_file in sorted(Path(out_dir).glob("*/config.json")):
        try:
            record = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or "identity" not in record:
            continue
        if _is_legacy(record) or record.get("identity_schema") != identity_schema():
            found.append(config_file.parent)
    return found


def _is_legacy(record: dict[str, Any]) -> bool:
    spec = record.get("spec")
    return not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION


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
        # sources first: a transfer run's identity names its source's configuration hash, which the
        # source's migration may change (_renamed_source_hash)
        for folder in sorted(legacy_folders(out_dir), key=_is_transfer_run):
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


def _is_transfer_run(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("spec", {}).get("transfer_from"))
    except (OSError, ValueError, AttributeError):
        return False


def _renamed_source_hash(out_dir: Path, source: dict[str, Any]) -> dict[str, Any]:
    """A transfer run's `transfer_from` with its source's configuration hash as renamed (when that
    source was migrated in this out_dir); unchanged otherwise."""
    for config_file in out_dir.glob("*/config.json"):
        try:
            record = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue
        was = record.get("migrated_from", {}) if isinstance(record, dict) else {}
        if record.get("task") == source.get("task") and was.get("config_hash") == source.get("config_hash"):
            return {**source, "config_hash": record["config_hash"]}
    return source


def _warn_once(folder: Path, message: str) -> None:
    if folder not in _WARNED:
        _WARNED.add(folder)
        print(f"warning: {folder} was written by an older version; {message}; it is left as it is", file=sys.stderr)


def _migrate_one(folder: Path, out_dir: Path) -> tuple[Path, Path] | None:
    config_file = folder / "config.json"
    record = json.loads(config_file.read_text())
    legacy = _is_legacy(record)
    try:  # a RunSpec record keeps its checkpoint's identity: only its name may be stale
        spec = legacy_spec(record, out_dir) if legacy else RunSpec.from_json(record["spec"], settings_classes())
    except (CheckpointError, KeyError, ValueError, TypeError) as error:
        _warn_once(folder, f"it cannot be mapped to its new name ({type(error).__name__}: {error})")
        return None
    if spec.transfer_from is not None:
        spec = spec.replace(transfer_from=_renamed_source_hash(out_dir, spec.transfer_from))
    source = Path(spec.checkpoint.source)
    if legacy and source.exists():
        newest = max((p.stat().st_mtime for p in source.iterdir() if p.is_file()), default=0.0)
        if newest > config_file.stat().st_mtime:
            _warn_once(folder, f"its checkpoint {source} was re-saved after the run, so it may not be the run's own")
            return None
    old_name = record.get("run") or folder.name  # the legacy name, also after a kill between rename and record
    target = folder.parent / spec.run_name()
    settled = record.get("run") in (None, folder.name) and record.get("config_hash") == spec.identity_hash()
    if not legacy and target == folder and settled:  # named as today's rule names it: stamp the schema only
        atomic_write_json(config_file, {**record, "identity": spec.identity(), "identity_schema": identity_schema()})
        return None
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
        identity_schema=identity_schema(),
        run=target.name,
        migrated_from={"run": old_name, "config_hash": record.get("config_hash")},
    )
    atomic_write_json(target / "config.json", record)
    rename_row(out_dir, old_name, target, spec.identity_hash())
    return folder, target


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
