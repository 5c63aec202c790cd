"""LoRA-KAN (the KOLMG-LoRA idea): LoRA whose linear bottleneck B·A is a two-layer KAN.

    y = W x + b + s · φ_out( q( φ_in( q( dropout(x) ) ) ) )        s = α / r  (rsLoRA: α / √r)
    φ(x) = SiLU(x) W_base + Σ_k c_k B_k(x)                           φ_in: in -> r, φ_out: r -> out

Identity at init: φ_out's base and spline weights are zero, so y = W x + b exactly.
Inputs kept inside the grid: q squashes each value into the grid range with a fixed tanh,
q(x) = lo + (hi - lo) · (tanh(x) + 1) / 2 (`lora_kan_squash`, default on); without it values
beyond the grid are clamped by the KAN layer (see modules/kan.py), never silently zeroed.
LoRA+ gives φ_out the larger learning rate (it plays B's role).

Not mergeable: φ_in and φ_out are non-linear in x, so no matrix ΔW reproduces them; a
finite-difference Jacobian "merge" is only right at one point and silently wrong elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import GPT2Config
from modules.kan import KANLinear
from modules.lora import lora_target_names


class KANLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, config: GPT2Config) -> None:
        super().__init__()
        self.base_layer = base_layer
        rank = config.lora_r
        self.scaling = config.lora_alpha / (rank ** 0.5 if config.lora_rslora else rank)
        self.dropout = nn.Dropout(config.lora_dropout)
        self.squash = config.lora_kan_squash
        self.lo, self.hi = config.kan_grid_range
        kan = dict(grid_size=config.kan_grid_size, grid_range=config.kan_grid_range,
                   spline_order=config.kan_spline_order, base=config.kan_base)
        self.kan_in = KANLinear(base_layer.in_features, rank, **kan)
        self.kan_out = KANLinear(rank, base_layer.out_features, zero_init=True, **kan)
        self.to(base_layer.weight.device)

    def _into_grid(self, x: torch.Tensor) -> torch.Tensor:
        if not self.squash:
            return x
        return self.lo + (self.hi - self.lo) * (torch.tanh(x) + 1) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.kan_out(self._into_grid(self.kan_in(self._into_grid(self.dropout(x)))))
        return self.base_layer(x) + self.scaling * delta


def apply_kan_lora(model: nn.Module, config: GPT2Config) -> None:
    for name in lora_target_names(config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, KANLoRALinear(getattr(parent, child), config))
