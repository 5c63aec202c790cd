"""The fused LoRA linear (modules/lora_linear.py) equals peft's own LoRA forward and backward: logits and
every trained gradient, with dropout on (the same masks), under fp32 and bf16 autocast, for the LoRA
variant's options and `peft_method="lora"`; configurations it was not written for run peft's forward."""

from __future__ import annotations

import copy

import pytest
import torch

from model import GPT2Config, GPT2LMHeadModel
from modules.lora_linear import unfuse_lora
from tests.conftest import perturb_adapters

CASES = {
    "lora": {"use_lora": True},
    "rslora_r4_qkv": {"use_lora": True, "lora_rslora": True, "lora_r": 4, "lora_targets": ("qkv", "mlp_out")},
    "pissa": {"use_lora": True, "lora_init": "pissa"},
    "lora_plus_no_dropout": {"use_lora": True, "lora_plus_ratio": 16.0, "lora_dropout": 0.0},
    "peft_lora": {"peft_method": "lora", "peft_config": {"lora_dropout": 0.1, "r": 4}},
    "lora_full_model": {"use_lora": True, "fine_tune_mode": "full-model"},  # W trains: peft's own forward
    "dora": {"use_lora": True, "lora_dora": True},  # a lora variant: peft's own forward
    "peft_lora_bias": {"peft_method": "lora", "peft_config": {"lora_bias": True}},  # B has a bias: peft's
}
FALLBACK = ("lora_full_model", "dora", "peft_lora_bias")


def backward_names(tensor: torch.Tensor) -> set[str]:
    """The autograd node names behind `tensor`."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def run(model, ids, autocast: bool, seed: int = 3):
    from model.trainable import set_trainable

    set_trainable(model, model.config.fine_tune_mode)
    model.train()
    torch.manual_seed(seed)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), out.loss.detach(), grads, backward_names(out.logits)


def drift(values, grads, reference) -> float:
    """The largest relative difference of logits, loss and each gradient from `reference`'s."""
    ref_logits, ref_loss, ref_grads, _ = reference
    worst = max((values[0] - ref_logits).abs().max() / ref_logits.abs().max(), abs(values[1] - ref_loss) / ref_loss)
    for name, grad in grads.items():
        ref = ref_grads[name]
        worst = max(worst, (grad - ref).abs().max() / max(ref.abs().max(), 1e-6))
    return float(worst)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_lora_equals_peft_forward_and_backward(case):
    torch.manual_seed(0)
    config = GPT2Config.from_preset("tiny", n_layer=2, **CASES[case])
    fused = perturb_adapters(GPT2LMHeadModel(config), scale=0.05)
    reference = copy.deepcopy(fused)
    unfuse_lora(reference)
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    ours, peft_fp32 = run(copy.deepcopy(fused), ids, False), run(copy.deepcopy(reference), ids, False)
    takes_fused = case not in FALLBACK
    assert ("_LoRALinearBackward" in ours[3]) == takes_fused and "_LoRALinearBackward" not in peft_fp32[3]
    assert ours[2].keys() == peft_fp32[2].keys() and ours[2]
    assert drift(ours[:2], ours[2], peft_fp32) <= 1e-5  # fp32: peft's numbers
    # bf16 autocast: every product in bf16 as under peft's autocast linears, summed in another order, so
    # not bit-equal; the fused path must be no farther from the fp32 numbers than peft's own bf16 path
    # (measured: 0.011-0.019 against peft's 0.011-0.018 of the largest value, per case)
    ours_bf16, peft_bf16 = run(fused, ids, True), run(reference, ids, True)
    assert ("_LoRALinearBackward" in ours_bf16[3]) == takes_fused
    ours_drift, peft_drift = (
        drift(ours_bf16[:2], ours_bf16[2], peft_fp32),
        drift(peft_bf16[:2], peft_bf16[2], peft_fp32),
    )
    assert 0 < peft_drift and ours_drift <= 1.25 * peft_drift + 1e-3, (ours_drift, peft_drift)


def test_merged_disabled_or_routed_adapters_run_peft_forward():
    """Where a fused call would be wrong (merged: the term is in W already; disabled: no term; peft's
    per-row `adapter_names`), peft's forward runs; a second, inactive adapter leaves the fused path on."""
    import pickle

    torch.manual_seed(0)
    model = perturb_adapters(GPT2LMHeadModel(GPT2Config.from_preset("tiny", use_lora=True)), scale=0.2)
    ids = torch.randint(0, 100, (2, 7))
    layers = [m for m in model.modules() if type(m).__name__ == "FusedLoraLinear"]
    assert len(layers) == 4 * model.config.n_layer
    x = torch.randn(2, 7, layers[0].in_features, requires_grad=True)
    with torch.no_grad():
        before = model(ids).logits
        base = layers[0].base_layer(x)
        for layer in layers:
            layer.merge()
        merged = model(ids).logits  # the fused path would add the low-rank term a second time
        for layer in layers:
            layer.unmerge()
    assert (merged - before).abs().max() <= 1e-4 * before.abs().max()
    layer = layers[0]
    layer.enable_adapters(False)
    off = layer(x)
    assert torch.equal(off, layer.base_layer(x)) and "_LoRALinearBackward" not in backward_names(off)
    layer.enable_adapters(True)
    assert "_LoRALinearBackward" in backward_names(layer(x))
    routed = layer(x, adapter_names=["default", "__base__"])  # row 1 without its adapter, as peft mixes
    assert "_LoRALinearBackward" not in backward_names(routed)
    assert torch.allclose(routed[1], base[1], atol=1e-6) and not torch.allclose(routed[0], base[0], atol=1e-3)
    restored = pickle.loads(pickle.dumps(model))  # the swapped class is found by name
    assert type(restored.transformer.h[0].attn.c_attn).__name__ == "FusedLoraLinear"
    assert torch.equal(restored.eval()(ids).logits, model.eval()(ids).logits)


def test_a_second_inactive_adapter_keeps_the_fused_path_and_peft_numbers():
    from modules.lora import peft_lora_config

    torch.manual_seed(0)
    model = perturb_adapters(GPT2LMHeadModel(GPT2Config.from_preset("tiny", use_lora=True)), scale=0.2)
    layer = model.transformer.h[0].attn.c_attn
    other = peft_lora_config(model.config)
    other.init_lora_weights = False  # B not zero: an active "other" would change the output
    layer.update_layer("other", 4, 8, other)  # a second adapter, not active
    assert layer.active_adapters == ["default"]
    x = torch.randn(3, 5, layer.in_features)
    fused = layer(x)
    reference = copy.deepcopy(model)
    unfuse_lora(reference)
    assert "_LoRALinearBackward" in backward_names(fused)
    assert torch.allclose(fused, reference.transformer.h[0].attn.c_attn(x), atol=1e-6)
    layer.set_adapter(["default", "other"])  # two active: peft's own sum
    assert "_LoRALinearBackward" not in backward_names(layer(x))
