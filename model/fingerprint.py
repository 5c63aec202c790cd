"""What a checkpoint *is*, independent of how its path is spelled: the identity a run records.

- A local folder: the SHA-256 of its `config.json` bytes and of each weight file (the shards an
  index names included). `ckpt/tiny`, `/abs/path/ckpt/tiny`, a copy or a moved folder all give the
  same digest; a re-saved or fine-tuned checkpoint gives another.
- A hub id: the id and the revision (commit) its cached `config.json` was resolved to.

Hashing gpt2-xl's 6 GB takes ~10 s, so a file's digest is cached per machine, keyed by its real
path, size and modification time (in `$GPT2_VARIANTS_CACHE`, default
`${XDG_CACHE_HOME:-~/.cache}/gpt2-variants`): a run start re-hashes only files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from model.files import atomic_write_json
from model.loading import WEIGHT_FILES, CheckpointError, _is_local, resolve_config_file

CHUNK = 1 << 24


def cache_file() -> Path:
    root = os.environ.get("GPT2_VARIANTS_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-variants"
    return Path(root) / "file-digests.json"


def _read_cache() -> dict[str, str]:
    try:
        value = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def file_digest(path: Path, cache: dict[str, str] | None = None) -> str:
    """SHA-256 of a file's bytes, looked up in `cache` by (real path, size, mtime) first."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    if cache is not None:
        cache[key] = digest.hexdigest()
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The files whose bytes are the checkpoint's weights (a sharded index and its shards included)."""
    files = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (ValueError, AttributeError) as error:
            raise CheckpointError(f"{index} is not a valid shard index ({error})") from error
        files += [folder / shard for shard in shards]
    return files


def checkpoint_identity(source: str | Path) -> dict[str, Any]:
    """{"digest": ...} for a local folder, {"hub": id, "revision": commit} for a hub id."""
    if not _is_local(source):
        config_file = resolve_config_file(source)  # .../snapshots/<commit>/config.json in the hub cache
        revision = config_file.parent.name if config_file.parent.parent.name == "snapshots" else "unknown"
        return {"hub": str(source), "revision": revision}
    folder = Path(source)
    cache = _read_cache()
    before = dict(cache)
    parts = [f"config.json:{file_digest(resolve_config_file(folder), cache)}"]
    parts += [f"{path.name}:{file_digest(path, cache)}" for path in weight_files(folder)]
    if cache != before:
        try:
            atomic_write_json(cache_file(), cache)
        except OSError:  # a read-only home: the digests are recomputed next time, nothing else changes
            pass
    return {"digest": hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]}
