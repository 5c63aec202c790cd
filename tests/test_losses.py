"""The fused LM-head cross-entropy equals plain autograd (loss and gradients), padding ignored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import GPT2LMHeadModel
from model.losses import IGNORE_INDEX, linear_cross_entropy, next_token_targets
from tests.conftest import PAD, VOCAB


@pytest.mark.parametrize("chunk_rows", [3, 4096])
def test_matches_autograd(chunk_rows):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=gen)
    targets[[2, 7]] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (loss * 3).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    (ref * 3).backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert (gh - hidden.grad).abs().max() <= 1e-5
    assert (gw - weight.grad).abs().max() <= 1e-5


def test_no_grad_path_equals_autograd_loss():
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (9,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
        ref = F.cross_entropy(hidden @ weight.t(), targets)
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_frozen_weight_gets_no_grad():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4])).backward()
    assert weight.grad is None and hidden.grad is not None


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="label ids"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 5]))


def test_targets_ignore_padding_and_last_position():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert next_token_targets(ids, None, mask).tolist() == [[6, 7, -100, -100], [9, -100, -100, -100]]


def test_model_loss_equals_hf_labels_loss(model_ckpt):
    path, hf = model_ckpt
    ours = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mine = ours(ids, labels=ids)
    assert mine.logits is None
    assert abs(mine.loss.item() - hf(ids, labels=ids).loss.item()) <= 1e-5


def test_padding_does_not_change_loss(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.full((1, 5), PAD)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1).long()
    alone = ours(ids, labels=ids).loss
    batched = ours(padded, attention_mask=mask, labels=padded).loss
    assert abs(alone.item() - batched.item()) <= 1e-5


def test_fused_loss_gradients_stay_fp32_under_bf16_autocast():
    """Under bf16 autocast the fused loss computes in fp32 (custom_fwd-style): its gradients equal the
    fp32 ones. (Before, its matmuls ran in bf16 while dW accumulated in fp32: dL/dh was ~2% off.)"""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=gen, requires_grad=True)
    weight = torch.randn(500, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 500, (64,), generator=gen)
    grads = []
    for autocast in (False, True):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(hidden, weight, targets)
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    (h32, w32), (h16, w16) = grads
    assert (h16 - h32).abs().max() <= 1e-5 * h32.abs().max()
    assert (w16 - w32).abs().max() <= 1e-5 * w32.abs().max()
