"""Our GPT-2 equals Hugging Face's GPT2LMHeadModel on the same checkpoint (float32, ≤ 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch

from model import GPT2LMHeadModel
from tests.conftest import PAD, TEST_DEVICE, VOCAB

ATOL = 1e-5


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """Parity is about fp32: with TF32 on, CUDA matmuls differ from fp32 by ~1e-3 (seen on an H100)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    # HF's forward counts positions with arange unless told; give it the padding-aware ones we use.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def padded_batch(vocab: int, lengths: list[int], total: int, side: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, total - length :] = 1
        else:
            mask[row, :length] = 1
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask


class OnDevice:
    """Runs a model on TEST_DEVICE (GPT2_TEST_DEVICE) and hands back CPU outputs, so the same
    comparisons check CUDA when asked; the shared HF fixture is copied, never moved."""

    def __init__(self, model):
        self.model = model if TEST_DEVICE == "cpu" else copy.deepcopy(model).to(TEST_DEVICE)
        self.config = getattr(model, "config", None)

    def __call__(self, *args, **kwargs):
        moved = [a.to(TEST_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.to(TEST_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = self.model(*moved, **kwargs)
        for name in ("logits", "last_hidden_state", "loss"):
            if isinstance(getattr(out, name, None), torch.Tensor):
                setattr(out, name, getattr(out, name).cpu())
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h.cpu() for h in out.hidden_states)
        return out


@pytest.fixture(params=["tiny", "small"])
def pair(request, model_ckpt, small_ckpt):
    path, hf = model_ckpt if request.param == "tiny" else small_ckpt
    return OnDevice(GPT2LMHeadModel.from_pretrained(path).eval()), OnDevice(hf)


def test_unpadded_logits_equal_hf(pair):
    ours, hf = pair
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine = ours(ids)
        ref = hf(ids, output_hidden_states=True)
    assert mine.logits.shape == (3, 40, ours.config.vocab_size)
    assert mine.last_hidden_state.shape == (3, 40, ours.config.n_embd)
    assert (mine.logits - ref.logits).abs().max().item() <= ATOL
    assert (mine.last_hidden_state - ref.hidden_states[-1]).abs().max().item() <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_equal_hf_at_real_positions(pair, side):
    ours, hf = pair
    ids, mask = padded_batch(VOCAB, [30, 17, 5, 1], 30, side)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert torch.isfinite(mine).all()
    real = mask.bool()
    assert (mine[real] - ref[real]).abs().max().item() <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_sequence_equals_sequence_alone(pair, side):
    ours, _ = pair
    ids, mask = padded_batch(VOCAB, [30, 12, 3], 30, side, seed=5)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = ours(ids[row][real][None]).logits[0]
            assert (batched[row][real] - alone).abs().max().item() <= ATOL


def test_padding_content_does_not_matter(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ids, mask = padded_batch(VOCAB, [20, 8], 20, "left", seed=2)
    other = ids.masked_fill(mask == 0, 7)  # different pad token content
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ours(other, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() <= ATOL


def test_causality(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0]).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        a, b = ours(ids).logits, ours(changed).logits
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # the check can fail: later positions do change


def test_dropout_active_in_train_mode_only(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0], embd_pdrop=0.5, attn_pdrop=0.5, resid_pdrop=0.5)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    ours.train()
    assert not torch.allclose(ours(ids).logits, ours(ids).logits)
    ours.eval()
    assert torch.equal(ours(ids).logits, ours(ids).logits)


def test_tanh_gelu_is_used():
    """GPT-2's "gelu_new" (tanh approximation), not exact erf-GELU, which differs by ~1e-3."""
    from transformers.activations import ACT2FN

    from modules.mlp import gelu_tanh

    x = torch.linspace(-6, 6, 1001)
    assert (gelu_tanh(x) - ACT2FN["gelu_new"](x)).abs().max().item() <= 1e-6
    assert (gelu_tanh(x) - torch.nn.functional.gelu(x)).abs().max().item() > 1e-4


def test_tied_embeddings(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_hf_parameter_names(model_ckpt):
    ours = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    names = set(dict(ours.named_parameters()))
    for expected in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.weight",
    ):
        assert expected in names
