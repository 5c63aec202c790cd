"""One function decides what trains, and the optimizer sees only what trains.

fine_tune_mode:
* `full-model`        every parameter of the model (and the task heads);
* `last-linear-layer` the task heads only (the course's mode); the whole model is frozen;
* `adapters`          only the parameters the enabled variants added, plus the task heads.
Default (`config.fine_tune_mode=None`): `adapters` when a variant flag is on, `full-model` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from model.config import FINE_TUNE_MODES
from modules.registry import is_lora_plus_param, switches


def set_trainable(model: Any, mode: str | None = None, heads: Iterable[nn.Module] = ()) -> dict[str, int]:
    mode = mode or model.config.resolved_fine_tune_mode
    if mode not in FINE_TUNE_MODES:
        raise ValueError(f"unknown fine_tune_mode {mode!r}; choose from {list(FINE_TUNE_MODES)}")
    heads = list(heads)
    if mode == "adapters" and not model.adapter_params:
        flags = "/".join(f"--{name}" for name in switches())
        raise ValueError(
            "fine_tune_mode='adapters' but no variant is enabled: nothing would train "
            f"(turn on {flags}, or use full-model)"
        )
    if mode == "last-linear-layer" and not heads:
        raise ValueError("fine_tune_mode='last-linear-layer' needs a task head to train")
    if mode == "full-model" and getattr(model.config, "quantize", None) is not None:
        raise ValueError(
            f"fine_tune_mode='full-model' on a quantised base ({model.config.quantize}): its weights cannot train; "
            "train adapters or the last linear layer"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(mode == "full-model" or (mode == "adapters" and name in model.adapter_params))
    for head in heads:
        head.requires_grad_(True)
    return count_parameters(model, heads)


def count_parameters(model: nn.Module, heads: Iterable[nn.Module] = ()) -> dict[str, int]:
    params = {id(p): p for m in (model, *heads) for p in m.parameters()}  # de-duplicates tied weights
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
    }


def build_param_groups(
    model: nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float = 1.0, heads: Iterable[nn.Module] = ()
) -> list[dict[str, Any]]:
    """AdamW param groups over trainable parameters only: no decay on vectors (biases, norms,
    gates, DoRA magnitudes), and lr x `lora_plus_ratio` on the parameters each enabled variant names
    as its LoRA+ side (LoRA's B, LoRA-KAN's φ_out)."""
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    named = [*model.named_parameters()] + [(f"head.{n}", p) for h in heads for n, p in h.named_parameters()]
    for name, param in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        decay, plus = param.dim() >= 2, lora_plus_ratio != 1.0 and is_lora_plus_param(name, model.config)
        group = groups.setdefault(
            (decay, plus),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * (lora_plus_ratio if plus else 1.0),
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters: call set_trainable first or check fine_tune_mode")
    return list(groups.values())


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, heads: Iterable[nn.Module] = (), **adamw_kwargs: Any
) -> torch.optim.AdamW:
    groups = build_param_groups(model, lr, weight_decay, model.config.lora_plus_ratio, heads)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr, **adamw_kwargs)


def hold_frozen_at(model: Any, dtype: torch.dtype) -> list[str]:
    """Store the frozen weights (and biases) of the blocks' plain linears at `dtype` (the run's compute
    precision: bf16 in a bf16 run), so autocast does not cast them again at every step; autocast caches
    casts only of leaf tensors that require grad. Returns the names of the parameters it converted.

    The numbers are unchanged: autocast would round the same fp32 values to the same bf16 values at
    each call (`F.linear` under autocast, the fused LoRA linear's explicit cast). Trained parameters,
    and so the optimizer state and training checkpoints, stay fp32. Only linears whose weight is read by
    a plain matmul are converted: a block's own `nn.Linear`, or the base of a vanilla peft LoRA layer.
    Left as they are: embeddings and the tied LM head (the residual stream stays fp32), LayerNorms,
    quantised layers, the bases of other peft tuners (some read W directly: OFT's rotations, DoRA's
    norms), and weights a variant saves as its state (PiSSA's residual W - BA)."""
    from peft.tuners.lora import LoraLayer

    saved = set(model.variant_state())
    converted = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name.startswith("transformer.h."):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if child == "base_layer":  # inside a peft layer: only vanilla LoRA's base is a plain matmul
            if (
                not isinstance(parent, LoraLayer)
                or parent.lora_variant
                or type(parent).__name__
                not in (
                    "Linear",
                    "FusedLoraLinear",
                )
            ):
                continue
        for leaf in ("weight", "bias"):
            param = getattr(module, leaf)
            full = f"{name}.{leaf}"
            if param is None or param.requires_grad or full in saved or not param.is_floating_point():
                continue
            param.data = param.data.to(dtype)
            converted.append(full)
    return converted
