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


def hf_autocast_loss(hidden, weight, targets):
    """The reference: HF's LM head under bf16 autocast (F.linear in bf16), then the loss on fp32 logits,
    as transformers' ForCausalLMLoss computes it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def test_the_fused_loss_runs_at_the_runs_precision_and_fp32_on_request():
    """Under bf16 autocast the fused loss's matmuls run in bf16 as HF's autocast LM head does: its loss and
    gradients drift from HF + autocast no more than HF's own bf16 drifts from fp32 allows (and far less
    than the fp32 option drifts from it); `fp32=True` equals the fp32 loss."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(96, 64, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(700, 64, generator=gen)).requires_grad_()
    targets = torch.randint(0, 700, (96,), generator=gen)
    targets[::7] = IGNORE_INDEX

    def run(fn):
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), hidden.grad.clone(), weight.grad.clone()

    def autocast(fp32):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(hidden, weight, targets, chunk_rows=40, fp32=fp32)

    reference = run(lambda: hf_autocast_loss(hidden, weight, targets))
    exact = run(lambda: F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX))
    ours = run(lambda: autocast(False))
    ours_fp32 = run(lambda: autocast(True))

    def drift(a, b):
        return [((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True)]

    assert ours[0].dtype == torch.float32
    loss_drift, dh_drift, dw_drift = drift(ours, reference)
    assert loss_drift <= 1e-6 and dh_drift <= 1e-6  # the same bf16 products as HF's autocast LM head
    assert dw_drift <= 1e-2  # dW: bf16 block products summed in fp32 (HF rounds the whole sum to bf16 once)
    assert max(drift(ours_fp32, exact)) <= 1e-5  # the fp32 option is the exact loss
    # bf16 is a real change: the fp32 option is farther from HF's autocast numbers than the default
    assert drift(ours, reference)[1] < drift(ours_fp32, reference)[1]
    assert min(drift(ours, exact)) > 1e-4
