"""Registry-parametrised variant matrix: identity at init, causality, padding invariance, trainable
sets, save/load, merge and export round trips. Every case runs on a tiny random HF checkpoint."""

from __future__ import annotations

import pytest
import torch

from model import GPT2LMHeadModel
from model.trainable import build_optimizer, set_trainable
from modules.registry import VARIANTS, enabled_variants
from tests.conftest import VOCAB
from tests.variant_cases import MERGEABLE, NOT_IDENTITY_AT_INIT, QUANTIZED, VARIANT_CASES

CASES = list(VARIANT_CASES)
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, lora_dropout=0.0)


def build(path, case, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel.from_pretrained(path, **NO_DROPOUT, **VARIANT_CASES[case]).eval()


def perturb_adapters(model, seed=1):
    """Make the adapters non-trivial (as after training) so round trips test something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in model.adapter_params:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def ids_batch(seed=0, batch=2, seq=12):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_every_registry_entry_is_in_the_matrix():
    from model import GPT2Config

    covered = {
        v.name for case in VARIANT_CASES.values() for v in enabled_variants(GPT2Config.from_preset("tiny", **case))
    }
    assert covered == set(VARIANTS)


@pytest.mark.parametrize("case", CASES)
def test_identity_at_init(model_ckpt, case):
    quantize = VARIANT_CASES[case].get("quantize")  # then the base is the same quantised base, adapters off
    base_knobs = dict(quantize=quantize, fine_tune_mode="last-linear-layer") if quantize else {}
    base = GPT2LMHeadModel.from_pretrained(model_ckpt[0], **NO_DROPOUT, **base_knobs).eval()
    model = build(model_ckpt[0], case)
    assert model.adapter_params, "the variant added no parameters"
    ids = ids_batch()
    with torch.no_grad():
        gap = (model(ids).logits - base(ids).logits).abs().max().item()
    if case in NOT_IDENTITY_AT_INIT:
        assert gap > 1e-3  # a fresh KAN really replaced the pretrained MLP
    else:
        assert gap <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_causality_and_padding_invariance(model_ckpt, case):
    model = build(model_ckpt[0], case)
    perturb_adapters(model)
    ids = ids_batch(seed=3, seq=14)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 11) % VOCAB
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on row 0
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
        assert torch.equal(a[:, :8], b[:, :8])
        assert not torch.allclose(a[:, 8:], b[:, 8:])
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 5:]).logits
    assert (padded[0, 5:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["adapters", "full-model", "last-linear-layer"])
def test_trainable_sets_and_frozen_weights_unchanged(model_ckpt, case, mode):
    model = build(model_ckpt[0], case).train()
    head = torch.nn.Linear(model.config.n_embd, 3)
    if mode == "full-model" and case in QUANTIZED:
        with pytest.raises(ValueError, match="quantised base"):
            set_trainable(model, mode, heads=[head])
        return
    set_trainable(model, mode, heads=[head])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "adapters":
        assert names == set(model.adapter_params)
    elif mode == "full-model":
        assert names == {n for n, _ in model.named_parameters()}
    else:
        assert names == set()
    assert all(p.requires_grad for p in head.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head_before = head.weight.detach().clone()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01, heads=[head])
    ids = ids_batch(seed=4)
    for _ in range(3):
        out = model(ids, labels=ids)
        loss = out.loss + head(out.last_hidden_state[:, -1]).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen but moved"
    assert not torch.equal(head.weight, head_before)


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_equals_full_recompute(model_ckpt, case):
    from modules.attention import KVCache
    from modules.prompt_learning import num_virtual_tokens

    model = build(model_ckpt[0], case)
    perturb_adapters(model)
    ids = ids_batch(seed=8, seq=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    cfg = model.config
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        capacity = 10 + num_virtual_tokens(cfg)  # prompt learning keeps its virtual tokens in the cache
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, capacity, cfg.head_dim, torch.float32, ids.device)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache).logits]
        for t in range(6, 10):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache).logits)
    real = mask.bool()
    assert (torch.cat(steps, dim=1)[real] - full[real]).abs().max().item() <= 1e-5


def test_adapters_mode_without_variant_raises(model_ckpt):
    model = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    with pytest.raises(ValueError, match="no variant is enabled"):
        set_trainable(model, "adapters")
    assert model.config.resolved_fine_tune_mode == "full-model"
    assert build(model_ckpt[0], "lora").config.resolved_fine_tune_mode == "adapters"


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip(model_ckpt, case, tmp_path):
    model = build(model_ckpt[0], case)
    perturb_adapters(model)
    model.save_adapters(tmp_path / "adapters")
    fresh = GPT2LMHeadModel.from_pretrained(model_ckpt[0], **NO_DROPOUT).eval()
    torch.manual_seed(123)  # a different random init of the adapters, overwritten by the load
    fresh.load_adapters(tmp_path / "adapters")
    ids = ids_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.config == model.config.replace(name=fresh.config.name)


@pytest.mark.parametrize("case", CASES)
def test_load_adapters_follows_the_models_device_and_dtype(model_ckpt, case, tmp_path):
    """Loading adapters into a model already moved (bf16 here, as a GPU stand-in; the meta device
    for placement) builds every variant module there, in that dtype."""
    build(model_ckpt[0], case).save_adapters(tmp_path / "adapters")
    fresh = GPT2LMHeadModel.from_pretrained(model_ckpt[0], **NO_DROPOUT).to(torch.bfloat16).eval()
    fresh.load_adapters(tmp_path / "adapters")
    # (a quantised base's packed weights are integers: the float ones follow the model)
    assert {p.dtype for p in fresh.parameters() if p.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        assert fresh(ids_batch(seed=5)).logits.dtype == torch.bfloat16
    if case in ("kan_ffn", "pissa"):
        return  # their start is computed from the pretrained weights' values (MLP fit, SVD): none on meta
    on_meta = GPT2LMHeadModel(fresh.config, with_variants=False).to("meta")
    on_meta.apply_variants()
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


def test_load_adapters_is_strict(model_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    model = build(model_ckpt[0], "lora")
    model.save_adapters(tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["transformer.h.0.attn.c_attn.lora_Z.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    fresh = GPT2LMHeadModel.from_pretrained(model_ckpt[0])
    with pytest.raises(ValueError, match=r"missing \[.*" + dropped.replace(".", r"\.") + r".*unexpected \[.*lora_Z"):
        fresh.load_adapters(tmp_path / "a")


@pytest.mark.parametrize("case", CASES)
def test_merge(model_ckpt, case):
    model = build(model_ckpt[0], case)
    perturb_adapters(model)
    ids = ids_batch(seed=6)
    with torch.no_grad():
        before = model(ids).logits
    if case not in MERGEABLE:
        with pytest.raises(ValueError, match="cannot merge exactly: .*"):
            model.merge_adapters()
        return
    model.merge_adapters()
    assert model.adapter_params == {} and not model.config.use_lora
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["lora", "dora", "pissa"])
def test_export_hf_round_trip(model_ckpt, case, tmp_path):
    import transformers

    model = build(model_ckpt[0], case)
    perturb_adapters(model)
    model.export_hf(tmp_path / "hf")
    assert model.adapter_params  # exporting merges a copy, not this model
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = ids_batch(seed=7)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_export_hf_refuses_kora(model_ckpt, tmp_path):
    model = build(model_ckpt[0], "kora")
    with pytest.raises(ValueError, match="non-linear"):
        model.export_hf(tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_kan_adapters_reload_after_a_grid_update(model_ckpt, tmp_path):
    """update_grid changes the coefficient shapes; the grid travels with the saved adapters."""
    model = build(model_ckpt[0], "kan_ffn")
    perturb_adapters(model)
    layer = model.transformer.h[0].mlp.kan_fc
    layer.update_grid(torch.linspace(-7, 7, 50)[:, None].expand(50, layer.in_features), refine=2)
    assert layer.spline_coeff.shape[-1] != model.config.kan_grid_size + model.config.kan_spline_order
    model.save_adapters(tmp_path / "adapters")
    fresh = GPT2LMHeadModel.from_pretrained(model_ckpt[0], **NO_DROPOUT).eval()
    fresh.load_adapters(tmp_path / "adapters")
    ids = ids_batch(seed=9)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.transformer.h[0].mlp.kan_fc.grid_size == layer.grid_size
