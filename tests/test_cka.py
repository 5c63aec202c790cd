"""linear_cka (scripts/cka.py) against its defining properties and a direct HSIC formula."""

from __future__ import annotations

import pytest
import torch

from scripts.cka import linear_cka


def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 - the paper's names
    """Gretton's biased HSIC estimator: tr(K H L H) / (n - 1)², H = I - 11ᵀ/n."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def random_pair(n: int = 64, dx: int = 20, dy: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64)
    y = x[:, :dy] @ torch.randn(dy, dy, generator=gen, dtype=torch.float64) + torch.randn(
        n, dy, generator=gen, dtype=torch.float64
    )
    return x, y


def test_identical_inputs_give_one_and_it_is_symmetric():
    x, y = random_pair()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_equals_the_hsic_formula():
    for seed in range(3):
        x, y = random_pair(seed=seed)
        k, l = x @ x.T, y @ y.T  # noqa: E741
        direct = hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))
        assert linear_cka(x, y) == pytest.approx(direct.item(), abs=1e-10)


def test_invariant_to_rotation_and_isotropic_scaling_but_not_to_a_general_linear_map():
    x, y = random_pair()
    gen = torch.Generator().manual_seed(5)
    rotation, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=gen, dtype=torch.float64))
    reference = linear_cka(x, y)
    assert linear_cka(x @ rotation, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 7.5 * y) == pytest.approx(reference, abs=1e-10)
    stretch = torch.diag(torch.logspace(-2, 2, x.shape[1], dtype=torch.float64))  # invertible, not orthogonal
    assert abs(linear_cka(x @ stretch, y) - reference) > 1e-2


def test_bad_shapes_and_constant_inputs_are_refused():
    x, y = random_pair()
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(8, 3), x[:8])
