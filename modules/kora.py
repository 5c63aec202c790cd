"""KoRA: Kolmogorov-inspired compositional adapters on the attention projections.

Per block, three low-rank adapters read the attention input x (B, T, C):
    δq = B_q A_q x,  δk = B_k A_k x,  δv = B_v A_v x              A_*: (r, C), B_*: (C, r)
a CompositionBlock MLP mixes them into one update:
    δcomp = W_2 gelu(W_1 [δq; δk; δv] + b_1) + b_2                W_1: (d_comp, 3C), W_2: (C, d_comp)
which enters ONE projection (`kora_target`, default value) through a scalar gate g:
    v_new = v + g · δcomp

Identity at init: g = 0, so the block equals its base exactly; the gate's gradient
⟨∂L/∂v, δcomp⟩ is non-zero because A and B start random (not zero), so training can open it.
It is non-linear in x (the GELU), so it cannot be merged into W_attn: `merge_adapters()` refuses.
Parameter namespace: `attn.qkv_adapters.kora.*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modules.variant import LrPrior, Settings, Variant, knob, register

KORA_TARGETS = ("query", "key", "value")


@dataclass(frozen=True)
class KoRASettings(Settings):
    use_kora: bool = knob(False, "KoRA: composed q/k/v adapters through a zero-initialised gate", switch=True)
    kora_r: int = knob(8, "KoRA rank of each q/k/v adapter", low=1)
    kora_d_comp: int = knob(64, "KoRA composition MLP width", low=1)
    kora_target: Literal["value", "query", "key"] = knob("value", "projection the composed update enters")


class KoRAAdapter(nn.Module):
    def __init__(self, n_embd: int, rank: int, d_comp: int, target: str) -> None:
        super().__init__()
        self.n_embd = n_embd
        self.target_index = KORA_TARGETS.index(target)  # 0 = query, 1 = key, 2 = value slice of qkv
        # The three down/up projections as one (3r, C) and one block-diagonal-free set of ups.
        self.down = nn.Linear(n_embd, 3 * rank, bias=False)  # [A_q; A_k; A_v]
        self.up = nn.ModuleList(nn.Linear(rank, n_embd, bias=False) for _ in range(3))  # B_q, B_k, B_v
        self.compose = nn.Sequential(
            nn.Linear(3 * n_embd, d_comp), nn.GELU(approximate="tanh"), nn.Linear(d_comp, n_embd)
        )
        self.gate = nn.Parameter(torch.zeros(()))
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for up in self.up:
            nn.init.normal_(up.weight, std=1.0 / rank)

    def forward(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """x: attention input (B, T, C); qkv: the projection's output (B, T, 3C) -> adapted qkv."""
        low = self.down(x).chunk(3, dim=-1)  # 3 x (B, T, r)
        deltas = torch.cat([up(part) for up, part in zip(self.up, low, strict=True)], dim=-1)  # (B, T, 3C)
        composed = self.gate * self.compose(deltas)  # (B, T, C)
        parts = list(qkv.split(self.n_embd, dim=-1))
        parts[self.target_index] = parts[self.target_index] + composed
        return torch.cat(parts, dim=-1)


def attach_kora(model: nn.Module, config: Any) -> None:
    for block in model.transformer.h:
        device = block.ln_1.weight.device
        block.attn.qkv_adapters["kora"] = KoRAAdapter(
            config.n_embd, config.kora_r, config.kora_d_comp, config.kora_target
        ).to(device)


register(
    Variant(
        name="kora",
        lr_prior=LrPrior(
            1e-4,
            1e-3,
            "no published rate for KoRA: LoRA's range (Hu et al., 2021; 2e-4 on GPT-2), since its q/k/v "
            "adapters are LoRA-shaped and only a gated composition MLP is added",
        ),
        settings=KoRASettings,
        enabled=lambda c: c.use_kora,
        attach=attach_kora,
        tag=lambda c: f"kora-r{c.kora_r}-d{c.kora_d_comp}-{c.kora_target}",
        namespace="kora",
        not_mergeable="KoRA's composition MLP is non-linear in the input (GELU), so no weight matrix reproduces it; "
        "keep the adapters or export them unmerged",
    )
)
