"""KAN FFN (`use_kan` alone): the block's feed-forward network becomes a two-layer KAN.

    ffn(x) = dropout( KAN_2( KAN_1(x) ) )         KAN_l(x)_j = Σ_i w_ji b_l(x_i) + Σ_ik c_jik B_k(x_i) + bias_j

`kan_init="mlp"` (default) starts it as the pretrained MLP exactly:
    KAN_1: base b = identity, w = W_fc, bias = b_fc, c = 0     ->  W_fc x + b_fc
    KAN_2: base b = tanh-GELU, w = W_proj, bias = b_proj, c = 0 ->  W_proj gelu(h) + b_proj
so fine-tuning starts from GPT-2 (identity at init), and the splines learn a correction.
Parameters: the MLP's plus (G + k) spline coefficients per weight.

`kan_init="random"`: a freshly initialised KAN (SiLU base, as in the KAN paper) whose hidden width
`kan_hidden` defaults to the one that matches the MLP's parameter count. This replaces the
pretrained MLP with noise by design; it is NOT identity at init.

This file owns the KAN knobs (`use_kan`, grid, order, base, regulariser weights); LoRA-KAN
(modules/kan_lora.py) reads them too. Parameter namespace: `mlp.kan_fc.*`, `mlp.kan_proj.*`.
Not mergeable: the splines are no GPT-2 MLP weight. Auxiliary loss: the KAN regulariser
(`kan_l1`, `kan_entropy`, both 0 by default). Extra state: every layer's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from modules.kan import KANLinear, adopt_kan_grids, kan_aux_loss, kan_grids
from modules.mlp import MLP
from modules.variant import LrPrior, Settings, Variant, knob, register


@dataclass(frozen=True)
class KANSettings(Settings):
    use_kan: bool = knob(
        False, "KAN: the FFN becomes a two-layer KAN (with --use_lora: LoRA-KAN adapters)", switch=True
    )
    kan_grid_size: int = knob(5, "B-spline grid intervals G", low=1)
    kan_grid_range: tuple[float, float] = knob((-2.0, 2.0), "spline grid (low, high)", cli="pair")
    kan_spline_order: Literal[1, 2, 3] = knob(3, "spline order k: 1 piecewise linear, 2, 3 cubic")
    kan_init: Literal["mlp", "random"] = knob("mlp", "KAN FFN start: mlp (= pretrained MLP) | random")
    kan_hidden: int | None = knob(None, "random-init KAN FFN width (default: match the MLP's parameters)", low=1)
    kan_base: Literal["silu", "identity", "gelu"] = knob("silu", "base function of random KAN layers and LoRA-KAN")
    kan_l1: float = knob(0.0, "weight of the KAN L1 regulariser (auxiliary loss)", low=0)
    kan_entropy: float = knob(0.0, "weight of the KAN entropy regulariser (auxiliary loss)", low=0)

    def validate(self) -> None:
        if not self.kan_grid_range[0] < self.kan_grid_range[1]:
            raise ValueError(
                f"GPT2Config.kan_grid_range must be (low, high) with low < high, got {self.kan_grid_range}"
            )


def matched_hidden_width(n_embd: int, ffn_dim: int, grid_size: int, order: int) -> int:
    """Width H with 2·C·H·(1 + G + k) + H + C ≈ the MLP's 2·C·F + F + C parameters."""
    return max(1, round((2 * n_embd * ffn_dim + ffn_dim) / (2 * n_embd * (1 + grid_size + order) + 1)))


class KANFFN(nn.Module):
    def __init__(self, kan_fc: KANLinear, kan_proj: KANLinear, dropout: float) -> None:
        super().__init__()
        self.kan_fc, self.kan_proj = kan_fc, kan_proj
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.kan_proj(self.kan_fc(x)))


def _kan(config: Any, n_in: int, n_out: int, base: str, zero_init: bool) -> KANLinear:
    return KANLinear(
        n_in,
        n_out,
        grid_size=config.kan_grid_size,
        grid_range=config.kan_grid_range,
        spline_order=config.kan_spline_order,
        base=base,
        bias=True,
        zero_init=zero_init,
    )


def kan_ffn_from_mlp(mlp: MLP, config: Any) -> KANFFN:
    fc = _kan(config, config.n_embd, config.ffn_dim, "identity", zero_init=True)
    proj = _kan(config, config.ffn_dim, config.n_embd, "gelu", zero_init=True)
    for kan, linear in ((fc, mlp.c_fc), (proj, mlp.c_proj)):
        kan.base_weight.data.copy_(linear.weight.data)
        kan.bias.data.copy_(linear.bias.data)
    return KANFFN(fc, proj, config.resid_pdrop).to(mlp.c_fc.weight.device)


def random_kan_ffn(config: Any) -> KANFFN:
    hidden = config.kan_hidden or matched_hidden_width(
        config.n_embd, config.ffn_dim, config.kan_grid_size, config.kan_spline_order
    )
    return KANFFN(
        _kan(config, config.n_embd, hidden, config.kan_base, zero_init=False),
        _kan(config, hidden, config.n_embd, config.kan_base, zero_init=False),
        config.resid_pdrop,
    )


def attach_kan_ffn(model: nn.Module, config: Any) -> None:
    for block in model.transformer.h:
        device = block.mlp.c_fc.weight.device
        block.mlp = (
            kan_ffn_from_mlp(block.mlp, config) if config.kan_init == "mlp" else random_kan_ffn(config).to(device)
        )


def kan_ffn_tag(config: Any) -> str:
    tag = f"kan-{config.kan_init}-g{config.kan_grid_size}k{config.kan_spline_order}"
    return tag + ("-reg" if config.kan_l1 or config.kan_entropy else "")


register(
    Variant(
        name="kan_ffn",
        lr_prior=LrPrior(
            3e-5,
            1e-3,
            "no published rate for a KAN FFN inside a pretrained transformer: from near full fine-tuning's "
            "rates (with kan_init=mlp its base weights are the MLP's, and they train) up to the 1e-3 of the KAN "
            "paper's Adam examples (Liu et al., 2024, pykan)",
        ),
        settings=KANSettings,
        enabled=lambda c: c.use_kan and not c.use_lora,
        attach=attach_kan_ffn,
        tag=kan_ffn_tag,
        namespace="kan",
        not_mergeable="the KAN FFN replaces the MLP with spline functions that no GPT-2 MLP weight can express",
        quantize_refusal=lambda c: "the KAN FFN replaces the MLP, fitted from its float weights",
        aux_loss=kan_aux_loss,
        extra_state=kan_grids,
        before_load=adopt_kan_grids,
    )
)
