"""Our peft-on-our-modules LoRA equals stock HF GPT-2 + peft with the same adapter weights, the
scale is exactly α/r (α/√r with rsLoRA), and export_peft loads into stock HF + peft."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from model import GPT2LMHeadModel
from modules.lora import peft_lora_config
from tests.conftest import VOCAB, perturb_adapters

NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, lora_dropout=0.0)
KINDS = {"lora": {}, "rslora": dict(lora_rslora=True), "dora": dict(lora_dora=True)}


def trained_like(path, **knobs):
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(path, use_lora=True, lora_r=4, lora_alpha=32, **NO_DROPOUT, **knobs)
    return perturb_adapters(model)


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_equal_stock_hf_plus_peft(model_ckpt, kind):
    path, _ = model_ckpt
    ours = trained_like(path, **KINDS[kind])
    hf = transformers.GPT2LMHeadModel.from_pretrained(path)
    # Built independently of export_peft: peft's own wrapping of HF's Conv1D layers.
    reference = peft.get_peft_model(hf, peft_lora_config(ours.config, fan_in_fan_out=True)).eval()
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name in ours.adapter_params:
                ref_params["base_model.model." + name].copy_(param)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids).logits - reference(input_ids=ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rslora, expected", [(False, 32 / 4), (True, 32 / 2)])
def test_effective_scale_is_alpha_over_r(model_ckpt, rslora, expected):
    """The c_attn output moves by exactly scale · B A x: α=32, r=4 gives 8 (rsLoRA: 16), not 0.5."""
    model = trained_like(model_ckpt[0], lora_rslora=rslora)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, model.config.n_embd)
    with torch.no_grad():
        delta = layer(x) - layer.get_base_layer()(x)
        low_rank = x @ layer.lora_A["default"].weight.t() @ layer.lora_B["default"].weight.t()
    scale = (delta * low_rank).sum() / (low_rank * low_rank).sum()
    assert abs(scale.item() - expected) <= 1e-4
    assert (delta - expected * low_rank).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_peft_loads_in_stock_hf(model_ckpt, kind, tmp_path):
    path, _ = model_ckpt
    ours = trained_like(path, **KINDS[kind])
    ours.export_peft(tmp_path / "peft")
    hf = transformers.GPT2LMHeadModel.from_pretrained(path)
    loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - loaded(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_export_peft_refuses_non_lora(model_ckpt, tmp_path):
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0], use_kora=True)
    with pytest.raises(ValueError, match=r"writes one peft adapter \(use_lora or peft_method\)"):
        model.export_peft(tmp_path / "x")


def test_lora_plus_param_groups(model_ckpt):
    from model.trainable import build_param_groups, set_trainable

    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0], use_lora=True, lora_plus_ratio=16.0, lora_dora=True)
    set_trainable(model)
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.1, lora_plus_ratio=16.0)
    by_name = {name: g for g in groups for name in g["names"]}
    b_name = next(n for n in by_name if ".lora_B." in n)
    a_name = next(n for n in by_name if ".lora_A." in n)
    m_name = next(n for n in by_name if "magnitude" in n)
    assert by_name[b_name]["lr"] == pytest.approx(16e-3) and by_name[a_name]["lr"] == pytest.approx(1e-3)
    assert by_name[a_name]["weight_decay"] == 0.1 and by_name[m_name]["weight_decay"] == 0.0
    assert all(".lora_" in n for n in by_name)  # only trainable (adapter) parameters
