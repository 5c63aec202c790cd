"""LoRA-KAN (the KOLMG-LoRA idea): LoRA whose linear bottleneck B·A is a two-layer KAN.

    y = W x + b + s · φ_out( q( φ_in( q( dropout(x) ) ) ) )        s = α / r  (rsLoRA: α / √r)
    φ(x) = b(x) W_base + Σ_k c_k B_k(x)                              φ_in: in -> r, φ_out: r -> out

Enabled by `use_kan` + `use_lora`; reads the LoRA knobs (rank, alpha, dropout, targets, layers,
rsLoRA, DoRA, LoRA+) and the KAN knobs (grid, order, base, regulariser) and owns `lora_kan_squash`.
The gaussian/PiSSA inits are LoRA-only: asking for them here is refused, not ignored.

KOLMG-DoRA (`lora_dora` here, kolmg-lora's `use_dora=True`): a learnable per-output magnitude m,
initialised to the base weight's row norms ‖W‖_row, rescales the frozen base path:

    y = (W x + b) ⊙ m / ‖W‖_row + s · φ_out( q( φ_in( q( dropout(x) ) ) ) )

Unlike DoRA on a linear layer, which normalises the *adapted* weight, m ⊙ (W + sBA) / ‖W + sBA‖,
only the base is renormalised here: a non-linear adapter has no ΔW to put inside the norm, so the
KAN update is added outside it (and, as in kolmg-lora, the bias is rescaled with W x). m = ‖W‖_row
at init, so the identity holds. Not mergeable either: m alone could fold into W and b, φ cannot.

Identity at init: φ_out's base and spline weights are zero, so y = W x + b exactly.
Inputs kept inside the grid: q squashes each value into the grid range with a fixed tanh,
q(x) = lo + (hi - lo) · (tanh(x) + 1) / 2 (`lora_kan_squash`, default on); without it values
beyond the grid are clamped by the KAN layer (see modules/kan.py), never silently zeroed.
LoRA+ gives φ_out the larger learning rate (it plays B's role). Namespace: `kan_in`, `kan_out`.

Not mergeable: φ_in and φ_out are non-linear in x, so no matrix ΔW reproduces them; a
finite-difference Jacobian "merge" is only right at one point and silently wrong elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modules.kan import KANLinear, adopt_kan_grids, kan_aux_loss, kan_grids
from modules.lora import check_lora_layers, lora_scale, lora_target_names
from modules.variant import LrPrior, Settings, Variant, knob, register

LORA_KNOBS = (
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "lora_layers",
    "lora_rslora",
    "lora_dora",
    "lora_plus_ratio",
)
KAN_KNOBS = ("use_kan", "kan_grid_size", "kan_grid_range", "kan_spline_order", "kan_base", "kan_l1", "kan_entropy")


@dataclass(frozen=True)
class KANLoRASettings(Settings):
    lora_kan_squash: bool = knob(True, "LoRA-KAN: squash adapter inputs into the spline grid with tanh")


class KANLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, config: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        rank = config.lora_r
        self.scaling = lora_scale(config)
        self.dropout = nn.Dropout(config.lora_dropout)
        self.squash = config.lora_kan_squash
        self.lo, self.hi = config.kan_grid_range
        kan = dict(
            grid_size=config.kan_grid_size,
            grid_range=config.kan_grid_range,
            spline_order=config.kan_spline_order,
            base=config.kan_base,
        )
        self.kan_in = KANLinear(base_layer.in_features, rank, **kan)
        self.kan_out = KANLinear(rank, base_layer.out_features, zero_init=True, **kan)
        # KOLMG-DoRA's magnitude m = ‖W‖_row at init ("kan_" prefix: the variant's namespace)
        self.kan_magnitude = nn.Parameter(base_layer.weight.detach().float().norm(dim=1)) if config.lora_dora else None
        self.to(base_layer.weight.device)

    def _into_grid(self, x: torch.Tensor) -> torch.Tensor:
        if not self.squash:
            return x
        return self.lo + (self.hi - self.lo) * (torch.tanh(x) + 1) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.kan_out(self._into_grid(self.kan_in(self._into_grid(self.dropout(x)))))
        base = self.base_layer(x)
        if self.kan_magnitude is not None:  # W is frozen: its row norms carry no gradient (as in kolmg-lora)
            row_norm = self.base_layer.weight.detach().norm(dim=1).clamp(min=1e-8)
            base = base * (self.kan_magnitude / row_norm).to(base.dtype)
        # The splines compute in float32 (modules/kan.py says why); the layer answers in the base
        # projection's dtype (bf16 under autocast), so attention and the residual stream stay in the
        # run's precision, as with plain LoRA.
        return base + (self.scaling * delta).to(base.dtype)


def check_kan_lora(config: Any) -> None:
    check_lora_layers(config)
    if config.lora_init != "default":
        raise ValueError(
            f"lora_init={config.lora_init!r} is a LoRA-only initialisation; LoRA-KAN has its own "
            f"(zero φ_out): drop --lora_init or --use_kan"
        )


def attach_kan_lora(model: nn.Module, config: Any) -> None:
    for name in lora_target_names(config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, KANLoRALinear(getattr(parent, child), config))


def kan_lora_tag(config: Any) -> str:
    return (
        ("kandora" if config.lora_dora else "kanlora")
        + f"-r{config.lora_r}-a{config.lora_alpha:g}-g{config.kan_grid_size}k{config.kan_spline_order}"
        + ("-rs" if config.lora_rslora else "")
        + (f"-plus{config.lora_plus_ratio:g}" if config.lora_plus_ratio != 1.0 else "")
        + ("-reg" if config.kan_l1 or config.kan_entropy else "")
    )


register(
    Variant(
        name="kan_lora",
        lr_prior=LrPrior(
            1e-4,
            3e-3,
            "no published rate for LoRA-KAN: LoRA's range (Hu et al., 2021) widened up to 3e-3, since its "
            "spline coefficients start at zero like B and KAN examples train at 1e-3 (pykan)",
        ),
        settings=KANLoRASettings,
        enabled=lambda c: c.use_lora and c.use_kan,
        attach=attach_kan_lora,
        tag=kan_lora_tag,
        namespace="kan",
        reads=LORA_KNOBS + KAN_KNOBS,
        check=check_kan_lora,
        not_mergeable="LoRA-KAN's φ_in/φ_out (KOLMG-DoRA's too) are non-linear in the input, so no ΔW "
        "reproduces them (a finite-difference Jacobian is right at one point only)",
        aux_loss=kan_aux_loss,
        extra_state=kan_grids,
        before_load=adopt_kan_grids,
        quantize_refusal=lambda c: (
            "KOLMG-DoRA's magnitude reads the base weight's row norms, which a quantised weight does not hold"
            if c.lora_dora
            else None
        ),
        # φ_out plays B's role; KOLMG-DoRA's magnitudes join it, as peft's LoRA+ puts DoRA's (1-D) magnitudes
        lora_plus=lambda name: ".kan_out." in name or name.endswith(".kan_magnitude"),
    )
)
