"""A trained model, from wherever it is: a hub id, a Hugging Face checkpoint folder, or a run folder of
this project (its best checkpoint: the base model it started from, its variants, trained weights, the
frozen variant state its checkpoint keeps, and its task heads). Scoring (train/cli/evaluate.py), X-LoRA's
experts (train/run/experts.py), transfer (train/cli/transfer.py) and CKA (experiments/cka.py) load through it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from model import CheckpointError, GPT2LMHeadModel
from model.config import STACK_FIELDS
from model.files import UnreadableFile, read_json_object
from model.loading import resolve_config_file
from modules.peft_methods import legacy_peft_fields
from modules.registry import variant_state
from train.run import checkpoint as ckpt

log = logging.getLogger("evaluate")


def load_model(spec: str) -> tuple[GPT2LMHeadModel, dict[str, dict[str, torch.Tensor]], dict]:
    """(model, trained head weights per task, training flags) for a hub id, an HF folder or a run folder."""
    path = Path(spec)
    best = ckpt.checkpoint_folder(path / "checkpoints", "best") if path.is_dir() else None
    if best is None and (path / "checkpoints").is_dir():
        raise CheckpointError(
            f"{path} is a training run without a best checkpoint yet (no evaluation finished); "
            f"resume it with --resume or pass another model"
        )
    if best is None or not (path / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(spec), {}, {}
    try:
        record = read_json_object(path / "config.json", ("config", "training"))
    except UnreadableFile as error:
        raise CheckpointError(f"{path} is a run folder whose record is damaged: {error}") from None
    saved = legacy_peft_fields(record["config"])  # older records: the targets they were built with
    overrides = {k: v for k, v in saved.items() if k not in (*STACK_FIELDS, "name")}
    model = GPT2LMHeadModel.from_pretrained(record["training"]["model"], **overrides)
    heads = copy_run_weights(model, best)
    log.info("loaded run %s (best checkpoint %s): heads for %s", path, best.name, sorted(heads) or "none")
    # the precision training resolved (and evaluated in) on its device: older runs did not record it
    return model, heads, {**record["training"], "resolved_precision": record.get("precision", "fp32")}


def copy_run_weights(model: GPT2LMHeadModel, checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Copy a training checkpoint's model tensors (its trained weights and the frozen variant state it
    saved) into `model`, built with the run's config from the run's base checkpoint; returns the
    trained head weights per task. A tensor the model lacks, or of another shape, raises."""
    weights, _, _ = ckpt.load_checkpoint(checkpoint)
    own = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    ckpt.copy_into({**dict(model.named_parameters()), **variant_state(model, model.config)}, own, checkpoint)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if key.startswith("heads."):
            task, _, rest = key.removeprefix("heads.").partition(".")
            heads.setdefault(task, {})[rest] = value
    return heads


def check_model_exists(model: str) -> None:
    """ValueError when `model` is neither a local folder nor a checkpoint whose config.json can be read
    (a hub id: one small file), so a missing run is named as such before the task data are looked for
    (a missing run used to surface as "fetching the task data failed")."""
    if Path(model).expanduser().is_dir():
        return
    try:
        resolve_config_file(model)
    except CheckpointError as error:
        raise ValueError(str(error)) from None


def run_record(model: str) -> dict:
    """The `training` block of a run folder's config.json ({} for a checkpoint)."""
    try:
        record = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record.get("training", {}) if isinstance(record, dict) and "identity" in record else {}
