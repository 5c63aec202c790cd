"""Linear centred kernel alignment (CKA; Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited", eq. for linear kernels) between two activation matrices.

    CKA(X, Y) = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F · ‖Yᶜᵀ Yᶜ‖_F)        Xᶜ, Yᶜ: columns centred over the n rows

It equals HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with linear kernels K = X Xᵀ, L = Y Yᵀ. It is 1
for identical inputs, symmetric, and invariant to orthogonal transforms and isotropic scaling of
either input, but not to a general invertible linear map (that is the point of the measure).

(The CLI that collects per-block hidden states from run folders, issue 14, is not written yet.)
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, d_x) and (n, d_y) activation matrices (rows = the same n examples),
    computed in float64 (the Gram norms square activations: float32 loses digits at gpt2 width)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, d) matrices with the same n; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 examples")
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear_cka is undefined for a constant input (all rows equal)")
    return (cross / (norm_x * norm_y)).item()
