"""Crash-safe checkpoints: trainable weights, optimizer, scheduler, progress and every RNG state.

Layout inside a run folder:
    checkpoints/last-000120/   trainable.safetensors, optimizer.safetensors, state.json
    checkpoints/best-000100/   (same files)
    checkpoints/last.json      {"folder": "last-000120"}   <- replaced atomically after the folder is complete
    checkpoints/best.json
A checkpoint folder is written completely (files fsynced) under a name no pointer uses (`last-000120.1`
when the same step is saved again) before its pointer is switched, and the old folder is deleted only
after: a SIGKILL at any moment leaves each pointer on a complete checkpoint. Nothing is pickled:
tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.files import UnreadableFile, atomic_write_text, read_json_object, unshared
from train.run.state import saved_checkpoints


class CheckpointCorrupt(ValueError):
    """A checkpoint pointer or folder that cannot be read; the message names the file."""


class DiskFull(OSError):
    """No space left while writing a checkpoint; the message says where and what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_to_files(
    optimizer: torch.optim.Optimizer, copy: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = _to_cpu(value, copy)
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in meta["plain"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG state: torch CPU, the CUDA generator of *its own* device, Python's."""
    tensors = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def rank_rng_states(states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]):
    """Every rank's `rng_state()` (index = rank) as checkpoint entries: tensors `rng.<rank>.<kind>`
    and JSON {"ranks": [python state per rank]}, so each rank resumes from its own streams."""
    tensors = {f"rng.{rank}.{kind}": value for rank, (own, _) in enumerate(states) for kind, value in own.items()}
    return tensors, {"ranks": [meta for _, meta in states]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int = 0, device: str = "cpu") -> bool:
    """Restore this rank's saved RNG streams; False (nothing restored) when the checkpoint has none for
    `rank` (it was written by fewer processes). Reads the older single-process layout too."""
    if "ranks" not in meta:  # older checkpoints: one CPU state, every visible GPU's state, rank 0's only
        if rank != 0:
            return False
        cuda = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith("rng.cuda.")}
        own = {"torch": tensors["rng.torch"]}
        index = (torch.device(device).index or 0) if device.startswith("cuda") else None
        if index is not None and index in cuda:
            own["cuda"] = cuda[index]
        python = meta["python"]
    else:
        if rank >= len(meta["ranks"]):
            return False
        own = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")}
        python = meta["ranks"][rank]["python"]
    torch.set_rng_state(own["torch"])
    if "cuda" in own and device.startswith("cuda"):
        torch.cuda.set_rng_state(own["cuda"], device)
    version, internal, gauss = python
    random.setstate((version, tuple(internal), gauss))
    return True


def save_checkpoint(
    directory: Path,
    kind: str,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    writer: BackgroundWriter | None = None,
    variant_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> None:
    """Write `<kind>-<step>/` completely, then point `<kind>.json` at it, then drop the old folder.
    `rng`: the RNG state to record (default: this process's, now); the loop passes every rank's state
    at the end of `step` when it writes the checkpoint one step later, after that step's weights
    proved healthy. With a `writer` the tensors are copied to CPU now and the files are written on its
    thread, so training (and the other ranks' collectives) need not wait for the disk. `variant_state`:
    the variants' training-time state (model.training_state(): AdaLoRA's rank allocator), kept as
    `variant_state.*` tensors and a `variant_state` JSON block."""
    opt_tensors, opt_meta = _optimizer_to_files(optimizer, copy=writer is not None)
    rng_tensors, rng_meta = rng if rng is not None else rank_rng_states([rng_state()])
    weights = {k: _to_cpu(v, copy=writer is not None) for k, v in trainable.items()}
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler_state, "rng": rng_meta, "progress": progress}
    variant_tensors, variant_meta = variant_state or ({}, {})
    if variant_meta:
        state["variant_state"] = variant_meta
    extra = {f"{VARIANT_PREFIX}{k}": _to_cpu(v, copy=True) for k, v in variant_tensors.items()}
    files = (weights, {**opt_tensors, **rng_tensors, **extra}, json.loads(json.dumps(state)))  # JSON copy: a snapshot
    if writer is None:
        _write_checkpoint(directory, kind, step, *files)
    else:
        writer.submit(_write_checkpoint, directory, kind, step, *files)


def _to_cpu(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    # copy=True: a CPU tensor is cloned too, since training mutates it in place while a thread writes it
    return tensor.detach().to("cpu", copy=copy).contiguous()


def disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as safetensors reports it (a SafetensorError whose text carries os error 28)."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in ("No space left on device", "os error 28", "Disk quota exceeded"))


def _fresh_name(directory: Path, kind: str, step: int) -> str:
    """`<kind>-<step>`, or `<kind>-<step>.<n>` when that folder exists (the same step saved again, e.g. by
    a resumed run): a checkpoint is never written over the folder a pointer may name."""
    name = f"{kind}-{step:06d}"
    suffix = 0
    while (directory / (name if not suffix else f"{name}.{suffix}")).exists():
        suffix += 1
    return name if not suffix else f"{name}.{suffix}"


def _write_checkpoint(directory: Path, kind: str, step: int, weights: dict, tensors: dict, state: dict) -> Path:
    """Write the folder completely under a fresh name, switch `<kind>.json` to it, then delete the folder
    it named before: a kill at any moment leaves the pointer on a complete folder. A full disk removes
    the partial folder and raises DiskFull (the previous checkpoint stays)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = _fresh_name(directory, kind, step)
    final = directory / name
    staging = directory / f".{name}.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_file(unshared(weights), str(staging / "trainable.safetensors"))
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps(state, indent=1))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, final)
        _fsync_dir(directory)
        pointer = directory / f"{kind}.json"
        try:
            previous = json.loads(pointer.read_text())["folder"] if pointer.exists() else None
        except (ValueError, KeyError, TypeError):
            previous = None  # a corrupt pointer is replaced below
        atomic_write_text(pointer, json.dumps({"folder": name, "step": step}))
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full(error):
            raise DiskFull(
                f"disk full while writing the checkpoint at step {step} to {directory}; free space and --resume"
            ) from None
        raise
    # The folder the pointer named before, and any a kill left behind (a folder written but never pointed
    # at, a staging folder): only the one the pointer names now stays.
    stale = (
        {previous} | {p.name for p in directory.glob(f"{kind}-*")} | {p.name for p in directory.glob(f".{kind}-*.tmp")}
    )
    for old in sorted(n for n in stale if n and n != name):
        shutil.rmtree(directory / old, ignore_errors=True)
    return final


class BackgroundWriter:
    """Runs checkpoint writes one at a time on a thread. `submit` first waits for the previous write;
    `wait` re-raises a write's error in the training thread (so a full disk is never silent)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, function, *args) -> None:
        self.wait()

        def run() -> None:
            try:
                function(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def checkpoint_folder(directory: Path, kind: str) -> Path | None:
    """The folder `<kind>.json` points at. A pointer that is missing, unreadable or points at nothing is
    a convenience lost, not the checkpoints: the newest complete `<kind>-*` folder is used instead (one
    line says so). None when there is no checkpoint; CheckpointCorrupt (naming the pointer) when a
    pointer is damaged and no complete folder is left."""
    pointer = directory / f"{kind}.json"
    if pointer.exists():
        try:
            name = str(read_json_object(pointer, ("folder",))["folder"])
            folder = directory / name
            if "/" in name or not folder.is_dir():
                raise UnreadableFile(f"{pointer} points at {folder}, which does not exist")
            return folder
        except UnreadableFile as error:
            problem = str(error)
    else:
        problem = f"{pointer} is missing"
    saved = saved_checkpoints(directory, kind)
    if not saved:
        if pointer.exists():
            raise CheckpointCorrupt(problem)
        return None
    note = f"{problem}; using the newest complete {kind} checkpoint, {saved[-1]}"
    if note not in _NOTED:
        _NOTED.add(note)
        print(note, file=sys.stderr)
    return saved[-1]


_NOTED: set[str] = set()  # recovery notes already printed by this process


VARIANT_PREFIX = "variant_state."
STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "progress")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """(trainable weights, state.json, optimizer + RNG tensors) of a checkpoint folder; state.json is
    checked against its schema (`check_state`)."""
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        state = read_json_object(folder / "state.json", STATE_KEYS)
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except Exception as error:  # noqa: BLE001 - truncated safetensors, bad JSON, missing file: one message
        raise CheckpointCorrupt(f"checkpoint {folder} cannot be read ({type(error).__name__}: {error})") from None
    check_state(state, folder)
    return trainable, state, tensors


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def check_state(state: dict[str, Any], folder: Path) -> None:
    """A state.json that parses is not yet believed: every field a resume reads must have its type and
    range, and the step must be the folder's own (`last-000300` holds step 300). CheckpointCorrupt
    names the file and the field."""
    where = folder / "state.json"

    def bad(field: str, expected: str, value: Any) -> CheckpointCorrupt:
        return CheckpointCorrupt(f"{where}: {field} must be {expected}, not {json.dumps(value)[:80]}")

    step = state["step"]
    stem = folder.name.split("-", 1)[-1].split(".")[0]
    if not _is_int(step) or (stem.isdigit() and step != int(stem)):
        raise bad("step", f"the folder's step ({int(stem) if stem.isdigit() else 'a count'})", step)
    progress = state["progress"]
    if not isinstance(progress, dict):
        raise bad("progress", "an object", progress)
    if progress.get("step") != step or not _is_int(progress.get("step")):
        raise bad("progress.step", f"the checkpoint's step ({step})", progress.get("step"))
    for field in ("epoch", "position", "bad_evals"):
        if field in progress and not _is_int(progress[field]):
            raise bad(f"progress.{field}", "a count (an integer >= 0)", progress[field])
    if progress.get("best_step") is not None and not (_is_int(progress["best_step"]) and progress["best_step"] <= step):
        raise bad("progress.best_step", f"a step <= {step}", progress["best_step"])
    if progress.get("best") is not None and not _is_number(progress["best"]):
        raise bad("progress.best", "a number", progress["best"])
    for field in ("train_seconds", "eval_seconds"):
        if field in progress and not (_is_number(progress[field]) and progress[field] >= 0):
            raise bad(f"progress.{field}", "seconds (a number >= 0)", progress[field])
    if not isinstance(progress.get("stopped", False), bool):
        raise bad("progress.stopped", "true or false", progress["stopped"])
    if progress.get("best_metrics") is not None and not isinstance(progress["best_metrics"], dict):
        raise bad("progress.best_metrics", "an object", progress["best_metrics"])
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise bad("optimizer.param_groups", "a non-empty list of parameter groups", groups)
    for index, group in enumerate(groups):
        if not (_is_number(group.get("lr")) and group["lr"] >= 0):
            raise bad(f"optimizer.param_groups[{index}].lr", "a learning rate (a number >= 0)", group.get("lr"))
        if not (isinstance(group.get("params"), list) and all(_is_int(i) for i in group["params"])):
            raise bad(f"optimizer.param_groups[{index}].params", "a list of parameter indices", group.get("params"))
    if not isinstance(optimizer.get("plain", {}), dict):
        raise bad("optimizer.plain", "an object", optimizer.get("plain"))
    scheduler = state["scheduler"]
    if not isinstance(scheduler, dict) or not _is_int(scheduler.get("last_epoch"), low=-1):
        raise bad("scheduler", "a scheduler state with last_epoch", scheduler)
    rng = state["rng"]
    ranks = rng.get("ranks", [rng]) if isinstance(rng, dict) else None  # [rng]: the older one-process layout
    if not isinstance(ranks, list) or not ranks:
        raise bad("rng.ranks", "a non-empty list (one entry per process)", ranks)
    for index, rank in enumerate(ranks):
        python = rank.get("python") if isinstance(rank, dict) else None
        if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)):
            raise bad(f"rng.ranks[{index}].python", "Python's random state [version, [ints], gauss]", python)


def copy_into(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved tensors into the named parameters; an unknown name or a shape mismatch raises."""
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{source}: weights {unknown[:5]} do not exist in the rebuilt model")
    with torch.no_grad():
        for key, value in weights.items():
            if params[key].shape != value.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, the model {tuple(params[key].shape)}"
                )
            params[key].copy_(value)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """Load the saved optimizer state; every state tensor must have its parameter's shape (torch's
    loader does not check, and AdamW would fail at the next step)."""
    opt_tensors = {k: v for k, v in tensors.items() if not k.startswith(("rng.", VARIANT_PREFIX))}
    optimizer.load_state_dict(_optimizer_from_files(opt_tensors, state["optimizer"]))
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"optimizer state {key} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )


def saved_variant_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The variants' training-time state a checkpoint holds (see save_checkpoint)."""
    own = {k.removeprefix(VARIANT_PREFIX): v for k, v in tensors.items() if k.startswith(VARIANT_PREFIX)}
    return own, state.get("variant_state", {})
