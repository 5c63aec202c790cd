"""Atomic file writers shared by the model (checkpoints, adapters) and training (run folders).

Every write goes through a temp file in the same folder and an `os.replace`, so a crash at any
moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only where tensors are written: reading run folders stays light
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        # after the write: mkstemp makes 0600 and some writers (safetensors) replace the file with their
        # own 0600 one; colleagues sharing a grid folder must read it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class UnreadableFile(ValueError):
    """A JSON file that cannot be read as the object it should be; the message names it and says why."""


def read_json_object(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in `path`, with the `required` keys; UnreadableFile otherwise (garbage, not UTF-8,
    a list, a key missing). A missing file raises FileNotFoundError as usual."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UnreadableFile(f"{path} is corrupt ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise UnreadableFile(f"{path} is corrupt (a JSON {type(value).__name__}, not an object)")
    missing = [key for key in required if key not in value]
    if missing:
        raise UnreadableFile(f"{path} is corrupt (it lacks {', '.join(missing)})")
    return value


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (a peft method's frozen tensor shared by every
    layer, e.g. VeRA's projections): those after the first are written as copies."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))
