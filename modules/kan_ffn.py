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
"""

from __future__ import annotations

from torch import nn

from model.config import GPT2Config
from modules.kan import KANLinear
from modules.mlp import MLP


def matched_hidden_width(n_embd: int, ffn_dim: int, grid_size: int, order: int) -> int:
    """Width H with 2·C·H·(1 + G + k) + H + C ≈ the MLP's 2·C·F + F + C parameters."""
    return max(1, round((2 * n_embd * ffn_dim + ffn_dim) / (2 * n_embd * (1 + grid_size + order) + 1)))


class KANFFN(nn.Module):
    def __init__(self, fc: KANLinear, proj: KANLinear, dropout: float) -> None:
        super().__init__()
        self.fc, self.proj = fc, proj
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.fc(x)))


def _kan(config: GPT2Config, n_in: int, n_out: int, base: str, zero_init: bool) -> KANLinear:
    return KANLinear(n_in, n_out, grid_size=config.kan_grid_size, grid_range=config.kan_grid_range,
                     spline_order=config.kan_spline_order, base=base, bias=True, zero_init=zero_init)


def kan_ffn_from_mlp(mlp: MLP, config: GPT2Config) -> KANFFN:
    fc = _kan(config, config.n_embd, config.ffn_dim, "identity", zero_init=True)
    proj = _kan(config, config.ffn_dim, config.n_embd, "gelu", zero_init=True)
    for kan, linear in ((fc, mlp.c_fc), (proj, mlp.c_proj)):
        kan.base_weight.data.copy_(linear.weight.data)
        kan.bias.data.copy_(linear.bias.data)
    return KANFFN(fc, proj, config.resid_pdrop).to(mlp.c_fc.weight.device)


def random_kan_ffn(config: GPT2Config) -> KANFFN:
    hidden = config.kan_hidden or matched_hidden_width(config.n_embd, config.ffn_dim, config.kan_grid_size,
                                                        config.kan_spline_order)
    return KANFFN(_kan(config, config.n_embd, hidden, config.kan_base, zero_init=False),
                  _kan(config, hidden, config.n_embd, config.kan_base, zero_init=False), config.resid_pdrop)


def apply_kan_ffn(model: nn.Module, config: GPT2Config) -> None:
    for block in model.transformer.h:
        block.mlp = kan_ffn_from_mlp(block.mlp, config) if config.kan_init == "mlp" else random_kan_ffn(config)
