"""The variant registry: config flag -> how the variant attaches to a loaded base model.

Variants attach AFTER the base weights are loaded (build base -> load strictly -> apply adapters),
in the registry's order, by target names; the block itself is never edited for a new variant.
`apply_variants` records which parameters each variant added (by tensor identity, so peft's
renaming of a base weight to `base_layer.weight` is not mistaken for a new parameter): that set is
what `fine_tune_mode="adapters"` trains and what `save_adapters` writes.

To add a variant: write its module file, add one `Variant` here, and the registry-parametrised
test matrix (tests/test_variants.py) covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from model.config import GPT2Config
from modules.graph import apply_graph
from modules.kan_ffn import apply_kan_ffn
from modules.kan_lora import apply_kan_lora
from modules.kora import apply_kora
from modules.lora import apply_lora, merge_lora


@dataclass(frozen=True)
class Variant:
    name: str
    enabled: Callable[[GPT2Config], bool]
    apply: Callable[[nn.Module, GPT2Config], None]
    merge: Callable[[nn.Module], int] | None = None  # None: cannot be merged exactly
    why_not_mergeable: str = ""


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        # use_kan alone swaps the FFN; use_kan + use_lora means LoRA-KAN adapters instead.
        Variant("kan_ffn", lambda c: c.use_kan and not c.use_lora, apply_kan_ffn,
                why_not_mergeable="the KAN FFN replaces the MLP with spline functions that no GPT-2 MLP "
                                  "weight can express"),
        Variant("lora", lambda c: c.use_lora and not c.use_kan, apply_lora, merge=merge_lora),
        Variant("kan_lora", lambda c: c.use_lora and c.use_kan, apply_kan_lora,
                why_not_mergeable="LoRA-KAN's φ_in/φ_out are non-linear in the input, so no ΔW reproduces "
                                  "them (a finite-difference Jacobian is right at one point only)"),
        Variant("kora", lambda c: c.use_kora, apply_kora,
                why_not_mergeable="KoRA's composition MLP is non-linear in the input (GELU), so no weight "
                                  "matrix reproduces it; keep the adapters or export them unmerged"),
        Variant("graph", lambda c: c.use_graph, apply_graph,
                why_not_mergeable="the graph-attention branch is a separate attention path, not a weight "
                                  "update of GPT-2"),
    )
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def enabled_variants(config: GPT2Config) -> list[Variant]:
    return [variant for variant in VARIANTS.values() if variant.enabled(config)]


def apply_variants(model: nn.Module, config: GPT2Config) -> dict[str, str]:
    """Attach every enabled variant; returns {parameter name: variant name} for the added ones."""
    added: dict[int, str] = {}
    for variant in enabled_variants(config):
        old_params = list(model.parameters())  # kept alive so a replaced module's ids are not reused
        before = {id(p) for p in old_params}
        variant.apply(model, config)
        for param in model.parameters():
            if id(param) not in before:
                added[id(param)] = variant.name
        del old_params
    return {name: added[id(p)] for name, p in model.named_parameters() if id(p) in added}
