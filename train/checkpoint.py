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
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.files import UnreadableFile, atomic_write_text, read_json_object, unshared


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
    """The folder `<kind>.json` points at, None when there is no pointer; a pointer that cannot be
    read or points at nothing raises CheckpointCorrupt naming it."""
    pointer = directory / f"{kind}.json"
    if not pointer.exists():
        return None
    try:
        name = read_json_object(pointer, ("folder",))["folder"]
    except UnreadableFile as error:
        raise CheckpointCorrupt(str(error)) from None
    folder = directory / str(name)
    if "/" in str(name) or not folder.is_dir():
        raise CheckpointCorrupt(f"{pointer} points at {folder}, which does not exist")
    return folder


VARIANT_PREFIX = "variant_state."
STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "progress")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """(trainable weights, state.json, optimizer + RNG tensors) of a checkpoint folder."""
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        state = read_json_object(folder / "state.json", STATE_KEYS)
        return trainable, state, load_file(str(folder / "optimizer.safetensors"))
    except Exception as error:  # noqa: BLE001 - truncated safetensors, bad JSON, missing file: one message
        raise CheckpointCorrupt(f"checkpoint {folder} cannot be read ({type(error).__name__}: {error})") from None


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
    opt_tensors = {k: v for k, v in tensors.items() if not k.startswith(("rng.", VARIANT_PREFIX))}
    optimizer.load_state_dict(_optimizer_from_files(opt_tensors, state["optimizer"]))


def saved_variant_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The variants' training-time state a checkpoint holds (see save_checkpoint)."""
    own = {k.removeprefix(VARIANT_PREFIX): v for k, v in tensors.items() if k.startswith(VARIANT_PREFIX)}
    return own, state.get("variant_state", {})
