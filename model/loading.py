"""Loading and saving Hugging Face GPT-2 checkpoints with a name map and full key accounting.

HF stores `c_attn`, `c_proj` and `c_fc` as Conv1D (weight: in x out); ours are `nn.Linear`
(out x in), so exactly those four weights are transposed. Every key is accounted for: loaded,
ignored on purpose (the causal-mask buffers old checkpoints carry, the tied `lm_head.weight`),
unexpected, or missing. A shape mismatch raises naming the key; missing keys raise unless
`strict=False` (a missing weight would otherwise stay randomly initialised, silently).
Nothing is unpickled: safetensors, or `torch.load(weights_only=True)` for `pytorch_model.bin`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file

from model.config import GPT2Config
from model.files import UnreadableFile, atomic_write_json, read_json_object, write_safetensors
from model.hub import hub_unreachable

log = logging.getLogger(__name__)

# Weights stored transposed by HF's Conv1D.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some HF checkpoints carry that are not parameters (the causal mask, recomputed here).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as GPT-2; the message says which file or key."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} "
            f"(mask buffers / tied lm_head), missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        )


# ---------------------------------------------------------------- locating files


def _hub_download(repo_id: str, filename: str) -> str | None:
    """The file from the hub (or its cache when the hub is unreachable); None when the repo lacks it."""
    unreachable = hub_unreachable()
    try:
        return hf_hub_download(repo_id, filename, local_files_only=unreachable is not None)
    except LocalEntryNotFoundError as error:
        # offline and not cached: not "the file does not exist"
        raise LocalEntryNotFoundError(f"{unreachable or 'no connection'}, and {filename} is not cached") from error
    except EntryNotFoundError:
        return None


def _is_local(name_or_path: str | Path) -> bool:
    path = Path(name_or_path)
    if path.exists():
        return True
    if str(name_or_path).startswith(("/", "./", "../", "~")):
        raise CheckpointError(f"checkpoint folder {name_or_path} does not exist")
    return False


def _hub_error(name_or_path: str | Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"could not load {str(name_or_path)!r}: it is not a local folder and fetching it from the "
        f"Hugging Face hub failed ({type(error).__name__}: {error}). Pass a local folder holding an HF "
        f"GPT-2 checkpoint (config.json + model.safetensors), or allow hub access (HF_HUB_OFFLINE unset)."
    )


def resolve_config_file(name_or_path: str | Path) -> Path:
    """config.json of a local checkpoint folder or a hub id (only that file is fetched)."""
    path = Path(name_or_path)
    if _is_local(name_or_path):
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a GPT-2 checkpoint folder: it has no config.json")
        return path / "config.json"
    try:
        config_file = _hub_download(str(name_or_path), "config.json")
    except Exception as error:  # offline, no such repo, no network: one clear message
        raise _hub_error(name_or_path, error) from error
    if config_file is None:
        raise CheckpointError(f"hub repo {name_or_path!r} has no config.json")
    return Path(config_file)


def resolve_weights_file(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if _is_local(name_or_path):
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    try:
        for name in WEIGHT_FILES:
            weights = _hub_download(str(name_or_path), name)
            if weights is not None:
                return Path(weights)
    except Exception as error:
        raise _hub_error(name_or_path, error) from error
    raise CheckpointError(f"hub repo {name_or_path!r} has no weights ({', '.join(WEIGHT_FILES)})")


def read_checkpoint_config(name_or_path: str | Path, name: str | None = None, **overrides: Any) -> GPT2Config:
    """The resolved config of a checkpoint with `overrides` applied, from its config.json alone (cheap:
    no weights are read), so flags can be validated at the real model size before anything loads.
    A broken checkpoint raises CheckpointError; an override that does not fit raises ValueError."""
    config_file = resolve_config_file(name_or_path)
    try:
        hf_config = read_json_object(config_file)
    except UnreadableFile as error:
        raise CheckpointError(str(error)) from None
    try:
        base = GPT2Config.from_hf_dict(hf_config)
    except ValueError as error:
        raise CheckpointError(f"{config_file}: {error}") from error
    return base.replace(**overrides, name=str(name or name_or_path))


def read_weights(weights_file: Path) -> dict[str, torch.Tensor]:
    if weights_file.name.endswith(".index.json"):
        index = json.loads(weights_file.read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_weights(weights_file.parent / shard))
        return state
    if weights_file.suffix == ".safetensors":
        try:
            return load_file(str(weights_file))
        except Exception as error:  # noqa: BLE001 - SafetensorError (truncated/corrupt file), OSError
            raise CheckpointError(f"{weights_file} cannot be read: {type(error).__name__}: {error}") from None
    try:
        return torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch's text for a refused pickle is many lines and advises
        # weights_only=False (running the file's code): one line instead, with a safe way out
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{weights_file} cannot be read as plain tensors ({first}); a file that needs full unpickling is "
            "refused, since unpickling runs code the file carries. Convert it to model.safetensors where you trust it"
        ) from None


# ---------------------------------------------------------------- name maps


def hf_to_ours(
    hf_state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    report = LoadReport(source=source)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        bare = key.removeprefix("transformer.")
        if key == "lm_head.weight" or bare.endswith(IGNORED_SUFFIXES):
            report.ignored.append(key)
            continue
        target = "transformer." + bare
        if target not in ours:
            report.unexpected.append(key)
            continue
        if bare.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)} vs model "
                f"{tuple(ours[target].shape)} (after the Conv1D transpose where it applies)"
            )
        converted[target] = tensor
        report.loaded.append(key)
    report.missing = sorted(k for k in ours if k not in converted and k != "lm_head.weight")
    if "lm_head.weight" in hf_state and "transformer.wte.weight" in converted:
        if not torch.equal(hf_state["lm_head.weight"], converted["transformer.wte.weight"]):
            log.warning("%s: lm_head.weight differs from wte.weight; GPT-2 ties them, using wte", source)
    return converted, report


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "lm_head.weight":  # tied to wte; HF re-ties on load
            continue
        bare = key.removeprefix("transformer.")
        tensor = tensor.detach()
        out[bare] = (tensor.t() if bare.endswith(CONV1D_WEIGHTS) else tensor).contiguous().cpu()
    return out


# ---------------------------------------------------------------- public entry points


def load_pretrained(
    cls: Any, name_or_path: str | Path, strict: bool = True, config: GPT2Config | None = None, **config_overrides: Any
):
    """`config`: this checkpoint's config already read and resolved (a run's validated one), so it is not
    read again; else its config.json with `config_overrides`."""
    if config is not None and config_overrides:
        raise ValueError("pass either a resolved config or config overrides, not both")
    config = config if config is not None else read_checkpoint_config(name_or_path, **config_overrides)
    weights_file = resolve_weights_file(name_or_path)
    # Build the base, load it strictly, and only then attach variants (they may read base weights).
    model = cls(config, with_variants=False)
    converted, report = hf_to_ours(read_weights(Path(weights_file)), model.state_dict(), str(name_or_path))
    if report.unexpected:
        log.warning("%s: unexpected keys not loaded: %s", name_or_path, ", ".join(report.unexpected))
    if report.missing:
        message = f"{name_or_path}: keys missing from the checkpoint: {', '.join(report.missing)}"
        if strict:
            raise CheckpointError(message + " (pass strict=False to keep their random init)")
        log.warning(message)
    model.load_state_dict(converted, strict=False)
    model.load_report = report
    log.info(report.summary())
    model.apply_variants()
    return model


def save_hf_checkpoint(model: Any, directory: str | Path) -> None:
    if model.adapter_params:
        raise ValueError("this model carries adapters; use export_hf(dir), which merges them first or says why not")
    if model.config.quantize is not None:
        raise ValueError(
            f"this model's base is quantised ({model.config.quantize}), not a GPT-2 checkpoint; its float weights "
            "are the checkpoint it was loaded from (save the task head or adapters instead)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", ours_to_hf(model.state_dict()))
    atomic_write_json(directory / "config.json", model.config.to_hf_dict())
