"""LoRA family through peft: LoRA, rsLoRA, DoRA, LoRA+ (optimizer side), PiSSA / gaussian init.

    y = W x + b + s · B A dropout(x)         A: (r, in), B: (out, r), s = α / r  (rsLoRA: α / √r)
    DoRA:  y = m ⊙ (W + s B A) x / ‖W + s B A‖_col + b       (m initialised to ‖W‖_col)

Identity at init: peft's default initialises B = 0 (and DoRA's m = ‖W‖), so the adapted model
equals the base exactly; PiSSA moves the top-r singular part of W into B A and keeps the residual
in W, so the sum is the base to float rounding. peft is configured with OUR field names
(`lora_alpha`, not an attribute set afterwards: the earlier project's `.alpha = 32` left peft's
default of 8 in force and a scale of 0.5 instead of 2).

Parameter namespace: peft's `lora_A` / `lora_B` / `lora_magnitude_vector` (all carry "lora").
PiSSA rewrites the targeted base weights (W - B A), so they are saved with the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from modules.lora_linear import use_fused_lora
from modules.variant import LrPrior, Settings, Variant, knob, register

if TYPE_CHECKING:
    from peft import LoraConfig

# peft (and the transformers it pulls in) is imported where it is used, not at start-up: it costs
# ~4 s, and every command line is validated (and a bad flag reported) before any model is built.

ADAPTER_NAME = "default"
LORA_TARGETS = {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}
LoraTarget = Literal["qkv", "attn_out", "mlp_in", "mlp_out"]


@dataclass(frozen=True)
class LoRASettings(Settings):
    use_lora: bool = knob(False, "LoRA adapters (peft) on the attention and MLP linears", switch=True)
    lora_r: int = knob(8, "LoRA rank r", low=1)
    lora_alpha: float = knob(16.0, "LoRA alpha: scale alpha/r (rsLoRA: alpha/sqrt(r))", low=0, low_open=True)
    lora_dropout: float = knob(0.05, "dropout on the LoRA input", low=0, high=1, high_open=True)
    lora_targets: tuple[LoraTarget, ...] = knob(("qkv", "attn_out", "mlp_in", "mlp_out"), "linears that get LoRA")
    lora_layers: tuple[int, ...] | None = knob(None, "block indices that get LoRA (default: every block)", low=0)
    lora_rslora: bool = knob(False, "rsLoRA scaling alpha/sqrt(r)")
    lora_dora: bool = knob(False, "DoRA: weight-decomposed LoRA")
    lora_init: Literal["default", "gaussian", "pissa"] = knob(
        "default", "default (kaiming A, zero B) | gaussian | pissa (principal singular vectors)"
    )
    lora_plus_ratio: float = knob(1.0, "LoRA+: learning rate of B = ratio x lr (1 = plain LoRA)", low=1.0)

    def validate(self) -> None:
        if self.lora_dora and self.lora_init == "pissa":
            raise ValueError("lora_dora with lora_init='pissa' is not supported (peft initialises one or the other)")


def check_lora_layers(config: Any) -> None:
    """LoRA's block indices must exist in the loaded checkpoint (shared with LoRA-KAN)."""
    if config.lora_layers is not None:
        bad = [i for i in config.lora_layers if not 0 <= i < config.n_layer]
        if bad:
            raise ValueError(
                f"GPT2Config.lora_layers {list(config.lora_layers)} must be block indices in "
                f"[0, {config.n_layer}) for this {config.n_layer}-block model"
            )


def lora_target_names(config: Any) -> list[str]:
    """Full module names (e.g. `transformer.h.3.attn.c_attn`) that receive adapters."""
    layers = range(config.n_layer) if config.lora_layers is None else config.lora_layers
    return [f"transformer.h.{i}.{LORA_TARGETS[t]}" for i in layers for t in config.lora_targets]


def peft_lora_config(config: Any, fan_in_fan_out: bool = False) -> LoraConfig:
    """The peft config equal to our knobs. `fan_in_fan_out=True` is for stock HF GPT-2 (Conv1D)."""
    from peft import LoraConfig

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


def lora_scale(config: Any) -> float:
    return config.lora_alpha / (config.lora_r**0.5 if config.lora_rslora else config.lora_r)


def attach_lora(model: nn.Module, config: Any) -> None:
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(peft_lora_config(config), model, adapter_name=ADAPTER_NAME)
    use_fused_lora(model)  # peft's maths as one autograd function per linear (modules/lora_linear.py)
    scale = lora_scale(config)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and abs(module.scaling[ADAPTER_NAME] - scale) > 1e-12:
            raise RuntimeError(f"{name}: peft LoRA scale {module.scaling[ADAPTER_NAME]} != requested {scale}")


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA/DoRA adapter into its base Linear and put the plain Linear back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())


def pissa_residuals(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """PiSSA rewrites the targeted base weights (W - B A): they must travel with the adapter."""
    if config.lora_init != "pissa":
        return {}
    return {name: p.detach() for name, p in model.named_parameters() if ".base_layer.weight" in name}


LORA_LR = LrPrior(
    1e-4,
    1e-3,
    "LoRA (Hu et al., 2021) trained GPT-2 medium on E2E at 2e-4; peft's method comparison runs LoRA at 1e-4 "
    "(method_comparison/MetaMathQA); rsLoRA, DoRA and LoRA+ papers tune in the same decade",
)
PISSA_LR = LrPrior(
    2e-5,
    2e-4,
    "PiSSA (Meng et al., 2024) trains at 2e-5, as full fine-tuning does: it adapts the principal singular "
    "part of W itself",
)


def lora_lr_prior(config: Any) -> LrPrior:
    return PISSA_LR if config.lora_init == "pissa" else LORA_LR


def lora_tag(config: Any) -> str:
    kind = "dora" if config.lora_dora else "rslora" if config.lora_rslora else "lora"
    return (
        f"{kind}-r{config.lora_r}-a{config.lora_alpha:g}"
        + (f"-{config.lora_init}" if config.lora_init != "default" else "")
        + (f"-plus{config.lora_plus_ratio:g}" if config.lora_plus_ratio != 1.0 else "")
    )


def lora_peft_export(config: Any) -> tuple[Any, str, None]:
    if config.lora_init == "pissa":
        raise ValueError(
            "PiSSA adapters are relative to a rewritten base (W - BA), not stock GPT-2; "
            "use export_hf(dir) to write the merged model instead"
        )
    return peft_lora_config(config, fan_in_fan_out=True), "default", None


def lora_quantize_refusal(config: Any) -> str | None:
    if config.quantize == "int8" and config.lora_dora:
        return "peft's int8 DoRA layer rebuilds the base weights as new float parameters; use nf4 for QDoRA"
    if config.lora_init == "pissa":
        return "PiSSA rewrites the base weights from their SVD"
    return None


register(
    Variant(
        name="lora",
        lr_prior=lora_lr_prior,
        settings=LoRASettings,
        # use_kan + use_lora means LoRA-KAN (modules/kan_lora.py) instead.
        enabled=lambda c: c.use_lora and not c.use_kan,
        attach=attach_lora,
        tag=lora_tag,
        namespace="lora",
        check=check_lora_layers,
        merge=merge_lora,
        extra_state=pissa_residuals,
        lora_plus=lambda name: ".lora_B." in name,
        quantize_refusal=lora_quantize_refusal,
        peft_export=lora_peft_export,
    )
)
