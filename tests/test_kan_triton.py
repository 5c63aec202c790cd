"""The Triton spline kernels (modules/kan_triton.py) against the torch reference path, run on the CPU
by Triton's interpreter (`TRITON_INTERPRET=1`): values and both gradients, several grid sizes and
orders, shapes that are not multiples of the tile, inputs outside the grid and exactly on knots."""

from __future__ import annotations

import importlib

import pytest
import torch

from modules import kan
from modules.kan import KANLinear, _SplineLinear, use_spline_kernel
from tests.conftest import TEST_DEVICE


@pytest.fixture
def triton_kernels():
    """modules.kan_triton, on the test device: on the CPU through Triton's interpreter, which
    tests/conftest.py turns on before anything imports triton."""
    module = importlib.import_module("modules.kan_triton")
    if TEST_DEVICE == "cpu":
        assert type(module._spline_forward).__name__ == "InterpretedFunction", "TRITON_INTERPRET=1 came too late"
    return module


def _inputs(rows: int, inputs: int, grid_size: int, lo: float, hi: float) -> torch.Tensor:
    x = torch.empty(rows, inputs).uniform_(lo - 0.5, hi + 0.5)  # some beyond the grid on both sides
    knots = torch.linspace(lo, hi, grid_size + 1)
    x[0, : min(inputs, grid_size + 1)] = knots[: min(inputs, grid_size + 1)]  # exactly on knots, hi included
    return x


@pytest.mark.parametrize(
    "rows,inputs,outputs,grid_size,order",
    [
        (37, 20, 45, 5, 3),  # the default KAN grid, tiles cut on every side
        (70, 40, 10, 1, 3),  # one interval: every basis alive everywhere
        (50, 33, 17, 3, 1),  # hat functions (LoRA-KAN's common case)
        (16, 16, 16, 8, 2),  # one tile exactly
        (65, 8, 33, 12, 2),  # a refined grid
    ],
)
def test_kernels_equal_the_reference(triton_kernels, rows, inputs, outputs, grid_size, order):
    torch.manual_seed(rows + grid_size)
    lo, hi = -1.0, 1.5
    h = (hi - lo) / grid_size
    x = _inputs(rows, inputs, grid_size, lo, hi).to(TEST_DEVICE).requires_grad_()
    coeff = torch.randn(outputs, inputs, grid_size + order, device=TEST_DEVICE, requires_grad=True)
    grad_out = torch.randn(rows, outputs, device=TEST_DEVICE)

    fused = triton_kernels.TritonSplineLinear.apply(x, coeff, lo, h, grid_size, order)
    fused_dx, fused_dc = torch.autograd.grad(fused, (x, coeff), grad_out)
    reference = _SplineLinear.apply(x, coeff, lo, h, grid_size, order)
    reference_dx, reference_dc = torch.autograd.grad(reference, (x, coeff), grad_out)

    scale = 1e-5 * (inputs * (grid_size + order)) ** 0.5
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=scale)
    torch.testing.assert_close(fused_dc, reference_dc, rtol=1e-5, atol=1e-5 * rows**0.5)
    torch.testing.assert_close(fused_dx, reference_dx, rtol=1e-5, atol=scale * outputs**0.5 / h)
    outside = (x < lo) | (x > hi)
    assert outside.any() and (fused_dx[outside] == 0).all()  # the spline is flat beyond the grid


def test_only_the_gradients_asked_for(triton_kernels):
    x = torch.randn(9, 5, device=TEST_DEVICE)
    coeff = torch.randn(4, 5, 8, device=TEST_DEVICE, requires_grad=True)
    y = triton_kernels.TritonSplineLinear.apply(x, coeff, -1.0, 0.4, 5, 3)
    (grad_coeff,) = torch.autograd.grad(y.sum(), coeff)
    expected = torch.autograd.grad(_SplineLinear.apply(x, coeff, -1.0, 0.4, 5, 3).sum(), coeff)[0]
    torch.testing.assert_close(grad_coeff, expected, rtol=1e-5, atol=1e-5)


def test_kan_layer_and_lora_kan_model_with_triton_kernel(triton_kernels):
    """`--kan_kernel triton` through the layers that use it: KANLinear (KAN-FFN) and LoRA-KAN's φ_in/φ_out,
    with a non-zero φ_out so the adapter's gradient reaches both KAN layers."""
    from model import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, use_lora=True, use_kan=True, lora_r=4
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(TEST_DEVICE).eval()  # no dropout: both passes see the same inputs
    for name, parameter in model.named_parameters():
        if "kan_out" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    ids = torch.randint(0, 50, (3, 11), device=TEST_DEVICE)

    def loss_and_grads():
        loss = model(ids).logits.square().mean()
        adapters = [p for n, p in model.named_parameters() if "kan_" in n]
        return loss, torch.autograd.grad(loss, adapters)

    reference_loss, reference_grads = loss_and_grads()
    layers = use_spline_kernel(model, "triton", TEST_DEVICE)
    assert layers == 2 * len(config.lora_targets) * config.n_layer  # φ_in and φ_out of every adapted projection
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)

    layer = KANLinear(24, 40, grid_size=7, spline_order=2).to(TEST_DEVICE)
    x = torch.randn(2, 5, 24, device=TEST_DEVICE)
    expected = layer(x)
    use_spline_kernel(layer, "triton", TEST_DEVICE)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_triton_kernel_refused_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        use_spline_kernel(KANLinear(4, 4), "triton", "cpu")
    with pytest.raises(ValueError, match="unknown KAN spline kernel"):
        use_spline_kernel(KANLinear(4, 4), "cuda", "cuda")
    assert kan.SPLINE_KERNELS == ("torch", "triton")
