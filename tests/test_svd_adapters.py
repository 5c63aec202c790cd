"""LoRA-XS and AntiPaSTO against direct implementations of their equations: the adapted layer, the
rotation, identity at init, exact merge, and which tensors train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import GPT2Config, GPT2LMHeadModel
from model.trainable import set_trainable
from modules.antipasto import AntiPaSTOLinear, cayley
from modules.lora_xs import LoRAXSLinear
from tests.conftest import VOCAB


def _linear(seed: int = 0, out_features: int = 24, in_features: int = 16) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features).double()
    return linear


def _svd(weight: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def test_lora_xs_is_the_papers_equation():
    linear, rank, alpha = _linear(), 4, 8.0
    layer = LoRAXSLinear(linear, rank, alpha)
    with torch.no_grad():
        layer.lora_xs_core.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    u, s, vh = _svd(linear.weight, rank)
    b, a = u, torch.diag(s) @ vh  # B = U_r, A = diag(S_r) V_rᵀ (frozen)
    expected = x @ linear.weight.T + linear.bias + (alpha / rank) * x @ (b @ layer.lora_xs_core @ a).T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


def _cayley_direct(p: torch.Tensor) -> torch.Tensor:
    q = p.triu(1) - p.triu(1).T
    eye = torch.eye(p.shape[0], dtype=p.dtype)
    return (eye - q) @ torch.linalg.inv(eye + q)


def test_antipasto_is_its_equation_with_a_block_cayley_rotation():
    linear, rank, block = _linear(1), 6, 3
    layer = AntiPaSTOLinear(linear, rank, block)
    with torch.no_grad():
        layer.antipasto_delta_s.normal_()
        layer.antipasto_rotation.normal_()
    rows, cols = torch.triu_indices(block, block, offset=1)
    blocks = []
    for params in layer.antipasto_rotation:
        p = torch.zeros(block, block, dtype=torch.float64)
        p[rows, cols] = params
        blocks.append(_cayley_direct(p))
    rotation = torch.block_diag(*blocks)
    assert torch.allclose(rotation @ rotation.T, torch.eye(rank, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rotation), torch.tensor(1.0, dtype=torch.float64))
    u, s, vh = _svd(linear.weight, rank)
    residual = linear.weight - u @ torch.diag(s) @ vh
    adapted = u @ torch.diag(s + layer.antipasto_delta_s) @ rotation @ vh + residual  # W'
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ adapted.T + linear.bias, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.rotation(), rotation, rtol=0, atol=1e-12)


def test_cayley_of_zero_is_the_identity():
    assert torch.equal(cayley(torch.zeros(2, 3), 3), torch.eye(3).expand(2, 3, 3))


@pytest.mark.parametrize("knobs", [dict(use_lora_xs=True), dict(use_antipasto=True, antipasto_block=2)])
def test_identity_at_init_exact_merge_and_only_the_core_trains(model_ckpt, knobs):
    base = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0], **knobs).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(model(ids).logits, base(ids).logits)  # exactly: the base path is untouched
    counts = set_trainable(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    config = model.config
    linears = config.n_layer * 4  # the four default targets per block
    if "use_lora_xs" in knobs:
        assert all(n.endswith("lora_xs_core") for n in trained)
        assert counts["trainable"] == linears * config.lora_xs_r**2
    else:
        r, b = config.antipasto_r, config.antipasto_block
        assert all(".antipasto_" in n for n in trained)
        assert counts["trainable"] == linears * (r + (r // b) * b * (b - 1) // 2)
    with torch.no_grad():
        for name in trained:
            model.get_parameter(name).normal_(std=0.1)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base(ids).logits, atol=1e-3)
    model.merge_adapters()
    assert not any("lora_xs" in n or "antipasto" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(use_lora_xs=True, use_lora=True),
        dict(use_antipasto=True, peft_method="ia3"),
        dict(use_antipasto=True, use_lora_xs=True),
    ],
)
def test_two_variants_on_one_linear_are_refused(knobs):
    with pytest.raises(ValueError, match="both would adapt the same linears"):
        GPT2Config.from_preset("tiny", **knobs)
