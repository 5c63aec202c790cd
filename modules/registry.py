"""The variant registry: every built-in variant module, imported once, registers itself here.

Variants attach AFTER the base weights are loaded (build base -> load strictly -> attach), in
registration order (the import order below), by target names; the block itself is never edited
for a new variant. `attach_variants` records which parameters each variant added (by tensor
identity, so peft's renaming of a base weight to `base_layer.weight` is not mistaken for a new
parameter): that set is what `fine_tune_mode="adapters"` trains and what `save_adapters` writes,
and each name must carry its variant's namespace.

To add a variant: write `modules/<name>.py` (see modules/variant.py for the contract), add one
import line below, and one row to tests/variant_cases.py (the matrix fails without it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# One line per built-in variant; importing a module registers it (order = attach order).
# isort: off
from modules import kan_ffn, lora, kan_lora, kora, graph, peft_methods, lora_xs, antipasto  # noqa: F401  (registration side effect)

# isort: on
from modules.imports import peft_sees_bitsandbytes
from modules.variant import VARIANTS, Settings, Variant, register, unregister

__all__ = [
    "VARIANTS",
    "Settings",
    "Variant",
    "register",
    "unregister",
    "enabled_variants",
    "attach_variants",
    "knob_owner",
    "used_knobs",
    "switches",
    "auxiliary_loss",
    "is_lora_plus_param",
    "variant_state",
    "after_step",
    "training_state",
    "load_training_state",
    "has_step_hooks",
]


def enabled_variants(config: Any) -> list[Variant]:
    return [variant for variant in VARIANTS.values() if variant.enabled(config)]


def knob_owner() -> dict[str, Variant]:
    """{knob name: the variant whose settings declare it}."""
    return {f.name: v for v in VARIANTS.values() for f in v.settings.knobs()}


def switches() -> list[str]:
    """The on/off flags (`use_lora`, ...) of every registered variant."""
    return [f.name for v in VARIANTS.values() for f in v.settings.knobs() if f.metadata.get("switch")]


def used_knobs(config: Any) -> set[str]:
    """Knobs the enabled variants actually read; any other knob set by the user is ignored by the model."""
    return set().union(*(v.uses() for v in enabled_variants(config)))


def attach_variants(model: nn.Module, config: Any) -> dict[str, str]:
    """Attach every enabled variant; returns {parameter name: variant name} for the added ones."""
    added: dict[int, str] = {}
    # peft would import bitsandbytes (seconds) for every attach; only a quantised base needs it
    with peft_sees_bitsandbytes(getattr(config, "quantize", None) is not None):
        for variant in enabled_variants(config):
            old_params = list(model.parameters())  # kept alive so a replaced module's ids are not reused
            before = {id(p) for p in old_params}
            variant.attach(model, config)
            for param in model.parameters():
                if id(param) not in before:
                    added[id(param)] = variant.name
            del old_params
    names = {name: added[id(p)] for name, p in model.named_parameters() if id(p) in added}
    prefix = getattr(getattr(model, "transformer", None), "prefix", None)
    if prefix is not None and prefix.prefix_length != prefix_positions(config):
        raise RuntimeError(  # the length checks (GPT2Config.input_positions) count what the config says
            f"{type(prefix).__name__} puts {prefix.prefix_length} positions ahead of the input, but the variants' "
            f"prefix_positions say {prefix_positions(config)}"
        )
    outside = [n for n, v in names.items() if VARIANTS[v].namespace not in n]
    if outside:
        raise RuntimeError(f"parameters added outside their variant's namespace: {outside[:5]}")
    return names


def auxiliary_loss(model: nn.Module, config: Any) -> torch.Tensor | None:
    """Sum of the enabled variants' auxiliary losses (e.g. the KAN regulariser); None if there are none."""
    total = None
    for variant in enabled_variants(config):
        if variant.aux_loss is not None and (term := variant.aux_loss(model, config)) is not None:
            total = term if total is None else total + term
    return total


def is_lora_plus_param(name: str, config: Any) -> bool:
    """Parameters that play LoRA's B role for an enabled variant (they get lr x lora_plus_ratio)."""
    return any(v.lora_plus is not None and v.lora_plus(name) for v in enabled_variants(config))


def variant_state(model: nn.Module, config: Any, checkpoints_only: bool = False) -> dict[str, torch.Tensor]:
    """Extra tensors the enabled variants save beside their parameters (KAN grids, PiSSA residuals);
    `checkpoints_only`: those a training checkpoint must hold too (a peft method's random frozen draws)."""
    state: dict[str, torch.Tensor] = {}
    for variant in enabled_variants(config):
        if variant.extra_state is not None and (variant.extra_state_in_checkpoints or not checkpoints_only):
            state.update(variant.extra_state(model, config))
    return state


def quantize_refusal(config: Any) -> str | None:
    """The first enabled variant's reason it cannot sit on a quantised base, or None."""
    reasons = (v.quantize_refusal(config) for v in enabled_variants(config) if v.quantize_refusal is not None)
    return next((reason for reason in reasons if reason), None)


def capture_blocker(model: nn.Module, config: Any) -> str | None:
    """The first enabled variant's reason CUDA graphs must not capture its forward, or None."""
    reasons = (v.capture_blocker(model, config) for v in enabled_variants(config) if v.capture_blocker is not None)
    return next((reason for reason in reasons if reason), None)


def prefix_positions(config: Any) -> int:
    """Positions the enabled variants' forward changes put ahead of the input (0 without any)."""
    return sum(v.prefix_positions(config) for v in enabled_variants(config) if v.prefix_positions is not None)


def has_step_hooks(config: Any) -> bool:
    return any(v.after_step is not None and v.needs_after_step(config) for v in enabled_variants(config))


def needs_data_init(config: Any) -> bool:
    return any(v.data_init is not None and v.needs_data_init(config) for v in enabled_variants(config))


def data_init(model: nn.Module, config: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    """Run the enabled variants' data-driven initialisations (once, before a fresh run's first step)."""
    for variant in enabled_variants(config):
        if variant.data_init is not None and variant.needs_data_init(config):
            variant.data_init(model, config, batches)


def after_step(model: nn.Module, config: Any, step: int, total_steps: int) -> None:
    """Run the enabled variants' after-step hooks (after optimizer.step, before zero_grad)."""
    for variant in enabled_variants(config):
        if variant.after_step is not None:
            variant.after_step(model, config, step, total_steps)


def training_state(model: nn.Module, config: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The variants' training-time state for a checkpoint: tensors keyed `<variant>.<name>`, JSON by variant."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for variant in enabled_variants(config):
        if variant.training_state is not None:
            own, info = variant.training_state(model)
            tensors.update({f"{variant.name}.{k}": v for k, v in own.items()})
            meta[variant.name] = info
    return tensors, meta


def load_training_state(model: nn.Module, config: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    for variant in enabled_variants(config):
        if variant.load_training_state is not None and variant.name in meta:
            prefix = f"{variant.name}."
            own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            variant.load_training_state(model, own, meta[variant.name])
