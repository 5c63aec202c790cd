"""X-LoRA's experts from finished run folders (modules/xlora.py mixes peft LoRA adapter folders).

`--peft_method xlora --peft_config '{"adapters": {"sst": "runs/sst-lora-...", "quora": "..."}}'`: each
adapter may be a finished run folder of `--peft_method lora` or `--use_lora`. Its best checkpoint is
exported once in peft's LoRA format (`export_peft`) to `<run>/exports/peft-<checkpoint>-<digest>/` (the
digest of the checkpoint's weights, so a checkpoint rewritten in place is exported anew), and that
folder is the expert the X-LoRA run records (with the digest of its tensors). An expert run must
have been trained from the same base checkpoint (by content) as the X-LoRA run.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from train.run import checkpoint as ckpt
from train.run.folder import read_record
from train.run.state import folder_state
from train.run.trained import load_model


def is_run_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def experts_from_runs(overrides: dict[str, Any], base_identity: dict[str, Any]) -> dict[str, Any]:
    """The config overrides with every X-LoRA expert given as a run folder replaced by its peft export."""
    peft_config = overrides.get("peft_config")
    method = overrides.get("peft_method") or str((peft_config or {}).get("peft_type", "")).lower()
    if method != "xlora" or not isinstance(peft_config, dict) or not isinstance(peft_config.get("adapters"), dict):
        return overrides
    adapters = {}
    for name, value in peft_config["adapters"].items():
        path = Path(value).expanduser() if isinstance(value, str) else None
        if path is not None and is_run_folder(path):
            value = str(export_expert(name, path.resolve(), base_identity))
        adapters[name] = value
    return {**overrides, "peft_config": {**peft_config, "adapters": adapters}}


def export_expert(name: str, run_dir: Path, base_identity: dict[str, Any]) -> Path:
    """`run_dir`'s best checkpoint as a peft LoRA adapter folder (written once, atomically)."""
    if folder_state(run_dir) != "finished":
        raise ValueError(f"X-LoRA expert {name!r}: run {run_dir} has not finished (finish it with --resume)")
    record = read_record(run_dir)
    theirs = ((record.get("spec") or {}).get("checkpoint") or {}).get("identity")
    if theirs != base_identity:
        raise ValueError(
            f"X-LoRA expert {name!r}: run {run_dir} was trained from another base checkpoint "
            f"({record.get('training', {}).get('model')!r}); an expert must adapt this run's --model"
        )
    best = ckpt.checkpoint_folder(run_dir / "checkpoints", "best")
    if best is None:
        raise ValueError(f"X-LoRA expert {name!r}: run {run_dir} has no best checkpoint")
    # named by the checkpoint's content too: a best checkpoint rewritten in place (same folder name) gets
    # a new export instead of the stale one (an export is never overwritten or deleted)
    digest = hashlib.sha256((best / "trainable.safetensors").read_bytes()).hexdigest()[:12]
    target = run_dir / "exports" / f"peft-{best.name}-{digest}"
    if (target / "adapter_model.safetensors").is_file():
        return target

    model, _, _ = load_model(str(run_dir))
    try:
        target.parent.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".peft-", dir=target.parent))
    except OSError as error:
        raise ValueError(
            f"X-LoRA expert {name!r}: cannot write its peft export into {target.parent} ({error.strerror}); "
            "export it elsewhere with GPT2LMHeadModel.export_peft and give that folder instead"
        ) from None
    try:
        try:
            model.export_peft(staging)
        except ValueError as error:
            raise ValueError(f"X-LoRA expert {name!r}: run {run_dir} has no LoRA adapter to mix: {error}") from None
        staging.rename(target)
    except OSError:
        if not (target / "adapter_model.safetensors").is_file():  # not another process's finished export
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
