"""GPT-2's position-wise feed-forward network.

    mlp(x) = dropout( gelu_tanh(x W_fc + b_fc) W_proj + b_proj )     # (B, T, C) -> (B, T, C)

GPT-2 uses the tanh approximation of GELU ("gelu_new"); exact erf-GELU differs by up to ~1e-3 and
would break parity with the released weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, n_embd: int, ffn_dim: int, resid_pdrop: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, ffn_dim)
        self.c_proj = nn.Linear(ffn_dim, n_embd)
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))
