"""LoRA-XS (Bałazy et al., 2024): a trained r×r core between frozen singular factors of the base weight.

    h = W x + b + (α/r) · B R A x,    B = U_r (out, r),  A = diag(S_r) V_rᵀ (r, in),  R (r, r)
where W ≈ U_r diag(S_r) V_rᵀ is the top-r SVD of the pretrained weight (modules/svd_adapters.py). Only R
trains: r² parameters per adapted linear (64 at r = 8, against LoRA's r·(in + out) = 24,576 on gpt2's
qkv), independent of the model's width.

Identity at init: R = 0, so the layer is the base exactly (the paper draws R from a small Gaussian;
zero keeps step 0 equal to the base model, and R still gets a gradient since A and B are fixed and
non-zero: ∂L/∂R = (α/r) Bᵀ g (A x)ᵀ). Merges exactly (a linear delta (α/r) B R A). The frozen factors are
saved with the adapters and in checkpoints. Parameter namespace: `lora_xs_core`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modules.lora import LoraTarget
from modules.svd_adapters import (
    SubspaceAdaptedLinear,
    attach_to_targets,
    check_rank,
    check_targets_free,
    frozen_factors,
    merge_into_base,
)
from modules.variant import LrPrior, Settings, Variant, knob, register


@dataclass(frozen=True)
class LoRAXSSettings(Settings):
    use_lora_xs: bool = knob(False, "LoRA-XS: a trained r x r core between frozen SVD factors", switch=True)
    lora_xs_r: int = knob(8, "LoRA-XS rank r (r^2 trained parameters per linear)", low=1)
    lora_xs_alpha: float = knob(16.0, "LoRA-XS alpha: the core's scale alpha/r", low=0, low_open=True)
    lora_xs_targets: tuple[LoraTarget, ...] = knob(("qkv", "attn_out", "mlp_in", "mlp_out"), "linears that get LoRA-XS")


class LoRAXSLinear(SubspaceAdaptedLinear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base, rank)
        self.scale = alpha / rank
        self.lora_xs_core = nn.Parameter(torch.zeros(rank, rank, device=base.weight.device, dtype=base.weight.dtype))

    def core(self, z: torch.Tensor) -> torch.Tensor:
        # A x = diag(S) V_rᵀ x = S ⊙ z, then R, then the scale
        return nn.functional.linear(z * self.svd_s, self.lora_xs_core) * self.scale

    def core_matrix(self) -> torch.Tensor:
        return self.scale * self.lora_xs_core @ torch.diag(self.svd_s)


def check_lora_xs(config: Any) -> None:
    check_targets_free(config, "use_lora_xs", config.lora_xs_targets)
    check_rank(config, "lora_xs_r")


register(
    Variant(
        name="lora_xs",
        lr_prior=LrPrior(
            1e-4,
            1e-2,
            "LoRA-XS (Balazy et al., 2024) tunes its r x r core over a wide grid, rates well above LoRA's; "
            "the range covers LoRA's 1e-4 up to 1e-2",
        ),
        settings=LoRAXSSettings,
        enabled=lambda c: c.use_lora_xs,
        attach=attach_to_targets(
            lambda c: c.lora_xs_targets, lambda linear, c: LoRAXSLinear(linear, c.lora_xs_r, c.lora_xs_alpha)
        ),
        tag=lambda c: f"loraxs-r{c.lora_xs_r}-a{c.lora_xs_alpha:g}",
        namespace="lora_xs",
        check=check_lora_xs,
        merge=lambda model: merge_into_base(model, LoRAXSLinear),
        extra_state=lambda model, config: frozen_factors(model, LoRAXSLinear),
        extra_state_in_checkpoints=True,
        quantize_refusal=lambda c: "LoRA-XS takes its frozen factors from the base weights' SVD",
    )
)
