"""What LoRA-XS (modules/lora_xs.py) and AntiPaSTO (modules/antipasto.py) share: adapters that live in the
top-r singular subspace of the pretrained weight they adapt.

For a target Linear y = W x + b with W (out, in), the truncated SVD W ≈ U_r diag(S_r) V_rᵀ is computed
once, in float64, when the adapter is attached (after the pretrained weights are loaded), and kept as
frozen buffers: U_r (out, r), S_r (r,), V_rᵀ (r, in). An adapted layer computes
    y = W x + b + U_r · core(V_rᵀ x)
where `core` (r -> r) is the variant's trained map, zero at init, so the layer is the base exactly at
step 0 (no rounding: the base path is untouched). The linear map U_r · core · V_rᵀ is a weight delta,
so merging is exact up to float rounding. The frozen factors travel with the adapters and in training
checkpoints: another machine's SVD can differ in sign or rounding, and the trained core only fits
the factors it was trained against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modules.lora import LORA_TARGETS  # the same four linears, by the same short names (peft imported lazily)


def top_singular(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_rᵀ) of `weight` (out, in), in its dtype; on the meta device, empty tensors of the
    right shapes (sizes are estimated on meta before anything is built: model/size.py)."""
    out_features, in_features = weight.shape
    if weight.is_meta:
        meta = {"device": "meta", "dtype": weight.dtype}
        shapes = ((out_features, rank), (rank,), (rank, in_features))
        return tuple(torch.empty(shape, **meta) for shape in shapes)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return (
        u[:, :rank].to(weight.dtype).contiguous(),
        s[:rank].to(weight.dtype).contiguous(),
        vh[:rank].to(weight.dtype).contiguous(),
    )


class SubspaceAdaptedLinear(nn.Module):
    """A Linear plus U_r · core(V_rᵀ x); subclasses define `core` and `core_matrix` (its r×r matrix)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        if rank > min(base.weight.shape):
            raise ValueError(f"rank {rank} exceeds min(out, in) = {min(base.weight.shape)} of the adapted linear")
        self.base_layer = base
        u, s, vh = top_singular(base.weight, rank)
        self.register_buffer("svd_u", u)
        self.register_buffer("svd_s", s)
        self.register_buffer("svd_vh", vh)

    def core(self, z: torch.Tensor) -> torch.Tensor:  # (..., r) -> (..., r)
        raise NotImplementedError

    def core_matrix(self) -> torch.Tensor:  # the r×r matrix M with core(z) = z Mᵀ
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = nn.functional.linear(x, self.svd_vh)  # V_rᵀ x: (..., r)
        return self.base_layer(x) + nn.functional.linear(self.core(z), self.svd_u)

    def delta_weight(self) -> torch.Tensor:
        return self.svd_u @ self.core_matrix() @ self.svd_vh


def target_names(config: Any, targets: tuple[str, ...]) -> list[str]:
    return [f"transformer.h.{i}.{LORA_TARGETS[t]}" for i in range(config.n_layer) for t in targets]


def wrap_targets(model: nn.Module, names: list[str], make) -> None:
    """Replace each named Linear by `make(linear)`."""
    for name in names:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        linear = getattr(module, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is {type(linear).__name__}, not a Linear: another variant already adapts it")
        setattr(module, child, make(linear))


def merge_into_base(model: nn.Module, kind: type[SubspaceAdaptedLinear]) -> None:
    """Fold each adapter's delta into its base Linear and put the plain Linear back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            with torch.no_grad():
                module.base_layer.weight += module.delta_weight().to(module.base_layer.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)


def frozen_factors(model: nn.Module, kind: type[SubspaceAdaptedLinear]) -> dict[str, torch.Tensor]:
    """The SVD buffers, saved with the adapters and in checkpoints (see the module docstring)."""
    return {
        f"{name}.{buffer}": getattr(module, buffer)
        for name, module in model.named_modules()
        if isinstance(module, kind)
        for buffer in ("svd_u", "svd_s", "svd_vh")
    }


def attach_to_targets(targets, make) -> Any:
    """The variant's attach: every linear `targets(config)` names, in every block, replaced by
    `make(linear, config)`."""

    def attach(model: nn.Module, config: Any) -> None:
        wrap_targets(model, target_names(config, targets(config)), lambda linear: make(linear, config))

    return attach


def check_rank(config: Any, knob: str) -> None:
    if getattr(config, knob) > config.n_embd:
        raise ValueError(f"GPT2Config.{knob} ({getattr(config, knob)}) exceeds the width n_embd ({config.n_embd})")


def check_targets_free(config: Any, variant: str, targets: tuple[str, ...]) -> None:
    """Two variants cannot both adapt one linear: LoRA, LoRA-KAN and peft methods wrap the same ones."""
    others = [flag for flag, on in (("use_lora", config.use_lora), ("use_kan", config.use_kan)) if on]
    if config.peft_method is not None:
        others.append(f"peft_method={config.peft_method}")
    taken = list(targets) if others else []
    if taken:
        raise ValueError(
            f"{variant} with {', '.join(others)}: both would adapt the same linears ({', '.join(taken)}); use one"
        )
