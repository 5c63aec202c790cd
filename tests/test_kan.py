"""KAN layer: bases equal scipy's BSpline design matrix, gradients pass gradcheck, out-of-grid
inputs are clamped (not zeroed), grid updates keep the function, the regulariser is differentiable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from modules import kan
from modules.kan import KANLinear, bspline_bases, dense_bases, kan_regularization


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid_size, lo, hi", [(5, -1.0, 1.0), (4, -2.5, 3.0)])
def test_bases_equal_scipy_design_matrix(order, grid_size, lo, hi):
    h = (hi - lo) / grid_size
    knots = lo + h * (np.arange(grid_size + 2 * order + 1) - order)
    x = np.concatenate([np.linspace(lo, hi, 301), np.random.default_rng(0).uniform(lo, hi, 200)])
    x = x[x < hi]  # scipy's design matrix is half-open at the right end
    ref = BSpline.design_matrix(x, knots, order).toarray()
    ours = bspline_bases(torch.tensor(x, dtype=torch.float64), lo, h, grid_size, order).numpy()
    assert ref.shape == ours.shape == (len(x), grid_size + order)
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("order", [1, 2, 3])
def test_closed_form_equals_scipy_and_the_local_form_with_its_derivative(order):
    """The CUDA path's closed form (dense_bases) against scipy's design matrix and its derivative
    (BSpline.derivative), and against the CPU path's local form, in and beyond the grid."""
    lo, hi, grid_size = -1.5, 2.0, 5
    h = (hi - lo) / grid_size
    knots = lo + h * (np.arange(grid_size + 2 * order + 1) - order)
    x = np.random.default_rng(1).uniform(lo, hi, 400)
    values, slopes = dense_bases(torch.tensor(x, dtype=torch.float64), lo, h, grid_size, order, derivative=True)
    identity = np.eye(grid_size + order)
    ref_values = np.stack([BSpline(knots, identity[j], order)(x) for j in range(grid_size + order)], -1)
    ref_slopes = np.stack([BSpline(knots, identity[j], order).derivative()(x) for j in range(grid_size + order)], -1)
    assert np.abs(values.numpy() - ref_values).max() <= 1e-9
    assert np.abs(slopes.numpy() - ref_slopes).max() <= 1e-8
    wide = torch.linspace(-4, 5, 301, dtype=torch.float64)  # beyond the grid: clamped, slope 0
    closed, closed_slope = dense_bases(wide, lo, h, grid_size, order, derivative=True)
    assert torch.allclose(closed, bspline_bases(wide, lo, h, grid_size, order), atol=1e-12)
    assert closed_slope[(wide < lo) | (wide > hi)].abs().max() == 0


@pytest.mark.parametrize("closed_form", [True, False])
def test_both_basis_paths_give_the_same_layer_and_gradients(closed_form, monkeypatch):
    torch.manual_seed(0)
    layer = KANLinear(6, 4, grid_size=5, spline_order=3, bias=True).double()
    x = (torch.randn(9, 6, dtype=torch.float64) * 1.5).requires_grad_(True)
    monkeypatch.setattr(kan, "CLOSED_FORM", not closed_form)
    other = layer(x)
    other_grads = torch.autograd.grad(other.sum(), (x, layer.spline_coeff))
    monkeypatch.setattr(kan, "CLOSED_FORM", closed_form)
    out = layer(x)
    grads = torch.autograd.grad(out.sum(), (x, layer.spline_coeff))
    torch.testing.assert_close(out, other, rtol=0, atol=1e-12)
    for a, b in zip(grads, other_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    coeff = layer.spline_coeff.detach().clone().requires_grad_(True)
    inputs = torch.tensor([[-0.83, 0.31], [0.12, 1.7], [-1.9, 0.93]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda inp, c: kan._SplineLinear.apply(inp, c, -1.0, 0.5, 4, 3), (inputs, coeff[:, :2, :7])
    )


def test_outside_grid_is_clamped_not_zeroed():
    bases = bspline_bases(torch.tensor([-7.0, 9.0]), -1.0, 0.4, 5, 3)
    assert torch.allclose(bases.sum(-1), torch.ones(2))  # partition of unity holds
    at_edges = bspline_bases(torch.tensor([-1.0, 1.0]), -1.0, 0.4, 5, 3)
    assert torch.allclose(bases, at_edges)


@pytest.mark.parametrize("order", [1, 3])
def test_gradcheck_float64(order):
    torch.manual_seed(0)
    layer = KANLinear(3, 2, grid_size=4, spline_order=order, bias=True).double()
    # keep x away from knots (order 1 has kinks there) but include out-of-grid points
    x = torch.tensor(
        [[-0.83, 0.31, 0.67], [0.12, -0.41, 1.7], [-1.9, 0.93, -0.06]], dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(layer, (x,))  # the whole layer w.r.t. its input
    coeff = layer.spline_coeff.detach().clone().requires_grad_(True)
    from modules.kan import _SplineLinear

    assert torch.autograd.gradcheck(lambda inp, c: _SplineLinear.apply(inp, c, -1.0, 0.5, 4, order), (x, coeff))


def test_layer_equals_definition():
    """y_j = Σ_i w_ji b(x_i) + Σ_ik c_jik B_k(x_i) + bias_j, written out with dense bases."""
    torch.manual_seed(0)
    layer = KANLinear(5, 3, grid_size=4, spline_order=3, base="gelu", bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(7, 5)
    bases = bspline_bases(x, layer.lo, layer.h, layer.grid_size, 3)  # (7, 5, 7)
    expected = layer.base_fn(x) @ layer.base_weight.t() + torch.einsum("nik,jik->nj", bases, layer.spline_coeff)
    assert (layer(x) - (expected + layer.bias)).abs().max().item() <= 1e-5


def test_update_grid_keeps_function_inside_old_grid():
    torch.manual_seed(0)
    layer = KANLinear(4, 3, grid_size=5, grid_range=(-1, 1), spline_order=3)
    with torch.no_grad():
        layer.spline_coeff.normal_()
    inside = torch.rand(200, 4) * 2 - 1
    before = layer(inside)
    layer.update_grid(torch.randn(500, 4) * 3, refine=2)
    assert layer.lo < -1 and layer.hi > 1 and layer.grid_size > 10
    after = layer(inside)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-4


def test_regularizer_is_differentiable_and_summed():
    model = torch.nn.Sequential(KANLinear(3, 4), KANLinear(4, 2))
    reg = kan_regularization(model, l1_weight=1.0, entropy_weight=0.5)
    reg.backward()
    assert reg.item() > 0 and model[0].spline_coeff.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="spline_order"):
        KANLinear(2, 2, spline_order=4)
    with pytest.raises(ValueError, match="base function"):
        KANLinear(2, 2, base="relu6")


def test_row_blocks_give_the_same_outputs_and_gradients(monkeypatch):
    """The spline matmul in row blocks (bounded temporaries) equals one block over every row."""
    import modules.kan as kan

    torch.manual_seed(0)
    layer = kan.KANLinear(6, 5, grid_size=5, spline_order=3)
    x = (torch.rand(37, 6) * 2.4 - 1.2).requires_grad_(True)
    results = []
    for elements in (1 << 30, 6 * 8 * 4):  # one block; blocks of 4 rows (the last one shorter)
        monkeypatch.setattr(kan, "CHUNK_ELEMENTS", elements)
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad.clone(), layer.spline_coeff.grad.clone()))
    assert len(kan._row_blocks(37, 6, 8)) == 10
    for one, blocked in zip(results[0], results[1], strict=True):
        assert torch.allclose(one, blocked, atol=1e-6)
