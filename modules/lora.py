"""LoRA family through peft: LoRA, rsLoRA, DoRA, LoRA+ (optimizer side), PiSSA / gaussian init.

    y = W x + b + s · B A dropout(x)         A: (r, in), B: (out, r), s = α / r  (rsLoRA: α / √r)
    DoRA:  y = m ⊙ (W + s B A) x / ‖W + s B A‖_col + b       (m initialised to ‖W‖_col)

Identity at init: peft's default initialises B = 0 (and DoRA's m = ‖W‖), so the adapted model
equals the base exactly; PiSSA moves the top-r singular part of W into B A and keeps the residual
in W, so the sum is the base to float rounding. peft is configured with OUR field names
(`lora_alpha`, not an attribute set afterwards: the earlier project's `.alpha = 32` left peft's
default of 8 in force and a scale of 0.5 instead of 2).
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from model.config import LORA_TARGETS, GPT2Config

ADAPTER_NAME = "default"


def lora_target_names(config: GPT2Config) -> list[str]:
    """Full module names (e.g. `transformer.h.3.attn.c_attn`) that receive adapters."""
    layers = range(config.n_layer) if config.lora_layers is None else config.lora_layers
    return [f"transformer.h.{i}.{LORA_TARGETS[t]}" for i in layers for t in config.lora_targets]


def peft_lora_config(config: GPT2Config, fan_in_fan_out: bool = False) -> LoraConfig:
    """The peft config equal to our knobs. `fan_in_fan_out=True` is for stock HF GPT-2 (Conv1D)."""
    init: bool | str = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[config.lora_init]
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_names(config),
        use_rslora=config.lora_rslora,
        use_dora=config.lora_dora,
        init_lora_weights=init,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )


def expected_scale(config: GPT2Config) -> float:
    return config.lora_alpha / (config.lora_r ** 0.5 if config.lora_rslora else config.lora_r)


def apply_lora(model: nn.Module, config: GPT2Config) -> None:
    inject_adapter_in_model(peft_lora_config(config), model, adapter_name=ADAPTER_NAME)
    scale = expected_scale(config)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and abs(module.scaling[ADAPTER_NAME] - scale) > 1e-12:
            raise RuntimeError(f"{name}: peft LoRA scale {module.scaling[ADAPTER_NAME]} != requested {scale}")


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA/DoRA adapter into its base Linear and put the plain Linear back."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name
