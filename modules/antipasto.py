"""AntiPaSTO (after lora-lite's table): trained singular-value deltas and a block-diagonal Cayley rotation
in the top-r singular subspace of the base weight.

With W = U_r diag(S_r) V_rᵀ + W_res (the top-r SVD, modules/svd_adapters.py; W_res the rest, frozen):
    W' = U_r diag(S_r + δs) R V_rᵀ + W_res,      R = blockdiag(R_1 … R_{r/b}),  R_i = (I − Q_i)(I + Q_i)⁻¹
with each Q_i = P_i − P_iᵀ skew-symmetric (b×b, from b(b−1)/2 trained numbers), so every R_i is a rotation
(the Cayley map of a skew matrix is orthogonal with determinant 1). Trained: δs (r) and the P_i
(r/b · b(b−1)/2). The layer computes y = W x + b + U_r [diag(S_r + δs) R − diag(S_r)] V_rᵀ x, which is W' x + b.

Identity at init: δs = 0 and P = 0 give R = I, so the bracket is exactly zero and the layer is the
base with no rounding. Merges exactly (a linear delta). Parameter namespace: `antipasto_`.
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
class AntiPaSTOSettings(Settings):
    use_antipasto: bool = knob(
        False, "AntiPaSTO: trained singular-value deltas and a block Cayley rotation of the top-r subspace", switch=True
    )
    antipasto_r: int = knob(8, "AntiPaSTO rank r (the adapted singular subspace)", low=1)
    antipasto_block: int = knob(4, "AntiPaSTO rotation block size b (r must be a multiple of b)", low=1)
    antipasto_targets: tuple[LoraTarget, ...] = knob(
        ("qkv", "attn_out", "mlp_in", "mlp_out"), "linears that get AntiPaSTO"
    )

    def validate(self) -> None:
        if self.antipasto_r % self.antipasto_block:
            raise ValueError(
                f"GPT2Config.antipasto_r ({self.antipasto_r}) must be a multiple of antipasto_block "
                f"({self.antipasto_block})"
            )


def cayley(skew_params: torch.Tensor, block: int) -> torch.Tensor:
    """(n, b(b−1)/2) strictly-upper entries -> (n, b, b) rotations (I − Q)(I + Q)⁻¹, Q = P − Pᵀ."""
    n = skew_params.shape[0]
    rows, cols = torch.triu_indices(block, block, offset=1, device=skew_params.device)
    upper = skew_params.new_zeros(n, block, block)
    upper[:, rows, cols] = skew_params
    q = upper - upper.transpose(1, 2)
    q = q.to(torch.promote_types(q.dtype, torch.float32))  # the solve in fp32 at least: CPU has no bf16 LU
    eye = torch.eye(block, dtype=q.dtype, device=q.device).expand(n, block, block)
    # (I + Q)⁻¹(I − Q) = (I − Q)(I + Q)⁻¹: the two factors commute. I + Q is invertible for skew Q.
    return torch.linalg.solve(eye + q, eye - q).to(skew_params.dtype)


class AntiPaSTOLinear(SubspaceAdaptedLinear):
    def __init__(self, base: nn.Linear, rank: int, block: int) -> None:
        super().__init__(base, rank)
        self.block = block
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.antipasto_delta_s = nn.Parameter(torch.zeros(rank, **factory))
        self.antipasto_rotation = nn.Parameter(torch.zeros(rank // block, block * (block - 1) // 2, **factory))

    def rotation(self) -> torch.Tensor:
        """The (r, r) block-diagonal R."""
        return torch.block_diag(*cayley(self.antipasto_rotation, self.block))

    def core(self, z: torch.Tensor) -> torch.Tensor:
        blocks = cayley(self.antipasto_rotation, self.block)  # (n, b, b)
        rotated = torch.einsum("nij,...nj->...ni", blocks, z.unflatten(-1, (-1, self.block))).flatten(-2)
        return (self.svd_s + self.antipasto_delta_s) * rotated - self.svd_s * z

    def core_matrix(self) -> torch.Tensor:
        return torch.diag(self.svd_s + self.antipasto_delta_s) @ self.rotation() - torch.diag(self.svd_s)


def check_antipasto(config: Any) -> None:
    check_targets_free(config, "use_antipasto", config.antipasto_targets)
    if config.use_lora_xs and set(config.antipasto_targets) & set(config.lora_xs_targets):
        raise ValueError("use_antipasto with use_lora_xs: both would adapt the same linears; use one")
    check_rank(config, "antipasto_r")


register(
    Variant(
        name="antipasto",
        lr_prior=LrPrior(
            1e-4,
            1e-2,
            "no published rate for AntiPaSTO: the range of LoRA-XS (modules/lora_xs.py), the other adapter "
            "that trains a few numbers inside the top-r singular subspace",
        ),
        settings=AntiPaSTOSettings,
        enabled=lambda c: c.use_antipasto,
        attach=attach_to_targets(
            lambda c: c.antipasto_targets, lambda linear, c: AntiPaSTOLinear(linear, c.antipasto_r, c.antipasto_block)
        ),
        tag=lambda c: f"antipasto-r{c.antipasto_r}-b{c.antipasto_block}",
        namespace="antipasto_",
        reads=("use_lora_xs", "lora_xs_targets"),
        check=check_antipasto,
        merge=lambda model: merge_into_base(model, AntiPaSTOLinear),
        extra_state=lambda model, config: frozen_factors(model, AntiPaSTOLinear),
        extra_state_in_checkpoints=True,
        quantize_refusal=lambda c: "AntiPaSTO takes its frozen factors from the base weights' SVD",
    )
)
