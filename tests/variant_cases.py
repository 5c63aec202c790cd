"""The variant test matrix: every registry entry must appear in at least one case here
(tests/test_variants.py checks that), so adding a variant to the registry adds its tests."""

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_lora_experts(count: int = 2, width: int = 32, layers: int = 2, rank: int = 2) -> dict[str, str]:
    """X-LoRA's experts for the matrix: random peft LoRA adapter folders (peft's layout) for the tiny
    model's linears (width 32, 2 blocks), written once per process to a temporary folder."""
    shapes = {"attn.c_attn": (width, 3 * width), "attn.c_proj": (width, width), "mlp.c_fc": (width, 4 * width)}
    shapes["mlp.c_proj"] = (4 * width, width)
    root = Path(tempfile.mkdtemp(prefix="xlora-experts-"))
    folders = {}
    for k in range(count):
        generator = torch.Generator().manual_seed(k)
        tensors = {}
        for block in range(layers):
            for name, (fan_in, fan_out) in list(shapes.items())[k % 2 :: 1 + k % 2]:  # different targets per expert
                key = f"base_model.model.transformer.h.{block}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.1
        (root / f"expert{k}").mkdir()
        save_file(tensors, root / f"expert{k}" / "adapter_model.safetensors")
        (root / f"expert{k}" / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 4})
        )
        folders[f"expert{k}"] = str(root / f"expert{k}")
    return folders


VARIANT_CASES: dict[str, dict] = {
    "lora": dict(use_lora=True),
    "rslora": dict(use_lora=True, lora_rslora=True),
    "dora": dict(use_lora=True, lora_dora=True),
    "lora_gaussian": dict(use_lora=True, lora_init="gaussian"),
    "pissa": dict(use_lora=True, lora_init="pissa"),
    "lora_plus_some_layers": dict(use_lora=True, lora_plus_ratio=16.0, lora_layers=(1,), lora_targets=("qkv",)),
    "kora": dict(use_kora=True),
    "kora_query": dict(use_kora=True, kora_target="query"),
    "lora+kora": dict(use_lora=True, use_kora=True),
    "kan_ffn": dict(use_kan=True),
    "kan_ffn_random": dict(use_kan=True, kan_init="random"),
    "kan_lora": dict(use_lora=True, use_kan=True),
    "kan_lora_order1_rslora_nosquash": dict(
        use_lora=True, use_kan=True, kan_spline_order=1, lora_rslora=True, lora_kan_squash=False, kan_grid_size=4
    ),
    "kolmg_dora": dict(use_lora=True, use_kan=True, lora_dora=True, kan_spline_order=1),
    "graph": dict(use_graph=True),
    "graph_dense_window": dict(use_graph=True, graph_backend="dense", graph_window=4),
    "graph+lora": dict(use_graph=True, use_lora=True),
    "peft_ia3": dict(peft_method="ia3"),
    "peft_loha_r4": dict(peft_method="loha", peft_config={"r": 4, "alpha": 8}),
    "peft_vera+graph": dict(peft_method="vera", use_graph=True),
    "peft_ia3+kora": dict(peft_method="ia3", use_kora=True),
    "lora_xs": dict(use_lora_xs=True),
    "lora_xs_qkv_r4": dict(use_lora_xs=True, lora_xs_r=4, lora_xs_targets=("qkv",)),
    "antipasto": dict(use_antipasto=True),
    "peft_prompt_tuning": dict(peft_method="prompt_tuning", peft_config={"num_virtual_tokens": 3}),
    "peft_p_tuning_lstm": dict(
        peft_method="p_tuning", peft_config={"num_virtual_tokens": 2, "encoder_reparameterization_type": "LSTM"}
    ),
    "peft_prefix_tuning+kora": dict(peft_method="prefix_tuning", peft_config={"num_virtual_tokens": 3}, use_kora=True),
    "antipasto+kora": dict(use_antipasto=True, antipasto_r=4, antipasto_block=2, use_kora=True),
    "peft_poly_one_task": dict(peft_method="poly", peft_config={"n_tasks": 1, "r": 4}),
    "peft_trainable_tokens": dict(peft_method="trainable_tokens", peft_config={"token_indices": [5, 11, 50]}),
    "lora_on_nf4": dict(use_lora=True, quantize="nf4"),
    "kora_on_int8": dict(use_kora=True, quantize="int8"),
    "kan_lora+kora+graph": dict(use_lora=True, use_kan=True, use_kora=True, use_graph=True, graph_window=3),
    "peft_xlora": dict(peft_method="xlora", peft_config={"adapters": random_lora_experts(), "xlora_depth": 2}),
}
MERGEABLE = {"lora", "rslora", "dora", "lora_gaussian", "pissa", "lora_plus_some_layers", "peft_ia3", "peft_loha_r4"}
MERGEABLE |= {"lora_xs", "lora_xs_qkv_r4", "antipasto", "peft_trainable_tokens"}
# Replaces pretrained weights with a fresh KAN by design: not the base model at step 0.
NOT_IDENTITY_AT_INIT = {"kan_ffn_random"}
# On a quantised base, identity holds against that base, not the float checkpoint (test_quantize.py).
QUANTIZED = {"lora_on_nf4", "kora_on_int8"}
# Virtual tokens are attended from the first step (modules/prompt_learning.py).
NOT_IDENTITY_AT_INIT |= {"peft_prompt_tuning", "peft_p_tuning_lstm", "peft_prefix_tuning+kora"}
# A fresh classifier mixes the experts (modules/xlora.py): the experts' average, not the base.
NOT_IDENTITY_AT_INIT |= {"peft_xlora"}
