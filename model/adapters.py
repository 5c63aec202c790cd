"""Adapters on disk and out of the project: save / load (strict), merge, export to HF and to peft.

* `save_adapters(dir)`: `adapter_model.safetensors` (the parameters the variants added, plus each
  variant's extra state: KAN grids, PiSSA's rewritten base weights) and `adapter_config.json`
  (the full GPT2Config).
* `load_adapters(dir)` onto a freshly loaded base: attaches the saved variants, lets each adopt its
  extra state (a KAN grid resizes its coefficients), then loads strictly (missing or unexpected
  keys raise, naming them).
* `merge_adapters()`: folds every enabled variant that can merge exactly into the base weights; a
  variant that is not linear in the input (KoRA, LoRA-KAN, ...) raises with its reason instead.
* `export_hf(dir)`: a plain HF GPT-2 checkpoint of the merged model.
* `export_peft(dir)`: the LoRA adapter, or a `peft_method` adapter, in peft's own format, for stock HF
  GPT-2 + peft.
All of it loops over the variant registry: no variant is named here except LoRA and peft_method for
peft's format.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.config import STACK_FIELDS, GPT2Config
from model.files import atomic_write_json, write_safetensors
from model.loading import ours_to_hf
from model.quantize import dequantized_weight, is_quantized
from modules.imports import peft_sees_bitsandbytes
from modules.registry import enabled_variants, variant_state

FORMAT = "gpt2-variants-adapters/1"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ADAPTER_STACK = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")  # must match to load


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Adapter parameters plus the extra state of every enabled variant."""
    tensors = {name: p.detach() for name, p in model.named_parameters() if name in model.adapter_params}
    tensors.update(variant_state(model, model.config))
    return tensors


def save_adapters(model: Any, directory: str | Path) -> None:
    if not model.adapter_params:
        raise ValueError("this model has no adapters to save (no variant flag is on)")
    directory = Path(directory)
    write_safetensors(directory / WEIGHTS, adapter_state_dict(model), {"format": "pt", "producer": FORMAT})
    meta = {
        "format": FORMAT,
        "variants": [v.name for v in enabled_variants(model.config)],
        "config": model.config.to_dict(),
    }
    atomic_write_json(directory / CONFIG, meta)


def load_adapters(model: Any, directory: str | Path) -> None:
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not an adapter folder: {name} is missing")
    meta = json.loads((directory / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    saved = GPT2Config.from_dict(meta["config"])
    for key in ADAPTER_STACK:
        if getattr(saved, key) != getattr(model.config, key):
            raise ValueError(
                f"adapters in {directory} were trained on {key}={getattr(saved, key)}, "
                f"but this model has {key}={getattr(model.config, key)}"
            )
    if model.adapter_params:
        raise ValueError("load_adapters expects a fresh base model without variants attached")
    # Keep this model's stack and provenance; take every variant knob from the saved config.
    stack = {key: getattr(model.config, key) for key in (*STACK_FIELDS, "name")}
    model.config = saved.replace(**stack)
    model.apply_variants()
    tensors = load_file(str(directory / WEIGHTS))
    for variant in enabled_variants(model.config):
        if variant.before_load is not None:
            variant.before_load(model, tensors)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter weights in {directory} do not match the model: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if expected[name].shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != model {tuple(expected[name].shape)}")
            expected[name].copy_(tensor)


def merge_adapters(model: Any) -> None:
    if model.config.quantize is not None:
        raise ValueError(
            f"cannot merge exactly: the base is quantised ({model.config.quantize}); a merged weight would be "
            "quantised again. Keep the adapters (save_adapters / export_peft) and apply them to the quantised base"
        )
    variants = enabled_variants(model.config)
    blocked = [v for v in variants if v.merge is None]
    if blocked:
        reasons = "; ".join(f"{v.name}: {v.not_mergeable}" for v in blocked)
        raise ValueError(f"cannot merge exactly: {reasons}")
    for variant in variants:
        variant.merge(model)
    model.adapter_params = {}
    model.config = model.config.base_config()


def export_hf(model: Any, directory: str | Path) -> None:
    """Plain HF GPT-2 checkpoint; mergeable adapters are merged on a copy (this model is unchanged)."""
    target = model
    if model.adapter_params:
        target = copy.deepcopy(model)
        merge_adapters(target)
    target.save_pretrained(directory)


def base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Base weights under their plain names (peft's `.base_layer.` / `.original_module.` removed), adapters and the
    variants' own buffers (a peft method's fixed projections) excluded; a quantised base's weights
    dequantised (what it computes with)."""
    extra = variant_state(model, model.config)
    # by identity: a parameter shared by several layers (VB-LoRA's bank) has more names in state_dict()
    adapters = {id(p) for name, p in model.named_parameters() if name in model.adapter_params}
    quantized = {f"{name}.": module for name, module in model.named_modules() if is_quantized(module)}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in adapters or name in extra:
            continue
        owner = next((prefix for prefix in quantized if name.startswith(prefix)), None)
        field = name.removeprefix(owner) if owner is not None else None
        if field == "weight":  # a quantised weight: the float values it computes with
            tensor = dequantized_weight(quantized[owner])
        elif field not in (None, "bias"):  # its quantisation constants (absmax, SCB, ...)
            continue
        # peft's wrappers keep the base module under a name of their own: a tuner layer's `base_layer`,
        # a modules_to_save wrapper's `original_module` (its trained copy is an adapter, left out above)
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor.detach()
    return state


def export_peft(model: Any, directory: str | Path) -> None:
    """Write the adapter in peft's own format for stock `transformers.GPT2LMHeadModel`: the LoRA family
    (`use_lora`), a `peft_method` whose peft layer accepts HF's Conv1D, or prompt learning's virtual
    tokens (peft stores the encoder's output, `prompt_embeddings`, which PeftModel loads for inference)."""
    enabled = enabled_variants(model.config)
    if len(enabled) != 1 or enabled[0].peft_export is None:
        raise ValueError(
            f"export_peft writes one peft adapter (use_lora or peft_method); this model has "
            f"{[v.name for v in enabled] or 'none'}"
        )
    peft_config, ours_adapter, fill = enabled[0].peft_export(model.config)  # ValueError: why not
    hf = stock_hf_copy(model)  # float weights, also from a quantised base
    peft_config.base_model_name_or_path = model.config.name
    with peft_sees_bitsandbytes(False):
        import peft  # heavy (pulls in transformers): imported only for this export

        wrapped = peft.get_peft_model(hf, peft_config)
    wrapped.peft_config["default"].base_model_name_or_path = model.config.name  # peft resets it from hf
    if str((model.config.peft_config or {}).get("target_modules", "")).lower() == "all-linear":
        # peft writes its expansion (every module's full name), which IA3's config then refuses on load, as
        # the feed-forward names are not among them: save the shorthand, which loads as the same modules
        wrapped.peft_config["default"].target_modules = "all-linear"
    if fill is not None:  # the variant fills peft's model itself (prompt learning: its encoder)
        fill(model, wrapped)
        wrapped.save_pretrained(str(directory))
        return
    theirs = wrapped.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if ours_adapter not in name.split("."):
                continue
            key = "base_model.model." + ".".join("default" if p == ours_adapter else p for p in name.split("."))
            if key not in theirs or theirs[key].shape != tensor.shape:
                raise RuntimeError(f"{name}: no tensor of that shape in peft's {type(peft_config).__name__} ({key})")
            theirs[key].copy_(tensor)
    wrapped.save_pretrained(str(directory))


def stock_hf_copy(model: Any):
    """A stock `transformers.GPT2LMHeadModel` holding this model's base weights (adapters left out)."""
    import transformers

    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    )
    missing, unexpected = hf.transformer.load_state_dict(ours_to_hf(base_state_dict(model)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"base weights did not map onto HF GPT-2: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.config.name_or_path = model.config.name
    return hf
