"""Run folders written by older versions, renamed to today's names (out of the hot path: train/run/folder.py
calls `migrate_legacy` only when a run's folder is not where today's rule puts it).

Folders written before `RunSpec` (their config.json has no `spec`) named their run by a hash of
`vars(args)` that included the `--model` string. They are migrated on first sight: their recorded settings
are read back into a `RunSpec`, the checkpoint they name is fingerprinted by content, and the folder is
renamed to its new name with its record and `runs.tsv` row updated. A folder whose checkpoint cannot be
found any more is left as it is, with a warning. A folder named under another settings schema (a field
added since) is renamed the same way.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from model.config import GPT2Config
from model.files import atomic_write_json
from model.fingerprint import checkpoint_identity
from model.loading import CheckpointError
from train.base.settings import MultitaskSettings, OutputSettings, RuntimeSettings, TrainingSettings
from train.run.index import rename_row
from train.run.lock import LOCK_NAME, RunFolderBusy, RunLock
from train.run.spec import SPEC_VERSION, Checkpoint, RunSpec, identity_schema
from train.tasks import TASKS
from train.tasks.base import settings_classes


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
