"""A quantised base (QLoRA): `GPT2Config.quantize = "nf4" | "int8"` (`--quantize`) stores every block's
linears (attention c_attn, c_proj; MLP c_fc, c_proj) with bitsandbytes before the variants attach.

    y = dequant(Q(W)) x + b (+ the adapter's update)
    Q = NF4: 4-bit NormalFloat in blocks of 64 with one absmax per block (QLoRA, Dettmers et al. 2023)
      | int8: LLM.int8(), row-wise absmax int8 with outlier columns (|x| > 6) kept in 16 bits

The embeddings, the LayerNorms and the tied LM head stay in float32, as QLoRA keeps them. The base is
frozen: only adapters (or the task head, `last-linear-layer`) train on it. Identity at init holds for
the adapters on top of the quantised base, not against the float base (the quantisation error stays).

Supported: LoRA and its options except PiSSA (rsLoRA, DoRA, LoRA+), KoRA, the graph branch, LoRA-KAN
(not KOLMG-DoRA), prompt learning, and the peft methods whose peft layer accepts bitsandbytes layers
(a method record's `quantized_base`, modules/peft_methods.py). The rest are refused with the reason (`check_quantize`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modules import registry

QUANTIZE_MODES = ("nf4", "int8")
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def refusal(config: Any) -> str | None:
    """Why this config cannot run on a quantised base, or None: full-model fine-tuning would train the
    quantised weights, and each variant says for itself (its `quantize_refusal`, modules/)."""
    if config.resolved_fine_tune_mode == "full-model":
        return "full-model fine-tuning would train the quantised weights; add an adapter or use last-linear-layer"
    return registry.quantize_refusal(config)


def check_quantize(config: Any) -> None:
    if config.quantize is None:
        return
    reason = refusal(config)
    if reason is not None:
        raise ValueError(f"quantize={config.quantize}: {reason}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"quantize={config.quantize} needs bitsandbytes: pip install -r requirements.txt") from None


def quantize_block_linears(model: nn.Module, mode: str) -> None:
    """Replace each block linear by its bitsandbytes counterpart holding the quantised weight (the
    quantisation itself happens when bitsandbytes moves the weight to its device)."""
    import bitsandbytes as bnb

    for block in model.transformer.h:
        for path in BLOCK_LINEARS:
            parent_name, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child)
            weight, device = linear.weight.data, linear.weight.device
            if mode == "nf4":
                # its compute dtype follows its input at every call (_input_in_run_precision)
                quantized = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=True, quant_type="nf4", compute_dtype=None
                )
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                # On a CPU with AVX512-BF16, bitsandbytes re-lays the weight out in place at its first eval
                # call (a packed CPU format), which fails for widths below its block size (64: the test
                # models) and changes what dequantising, merging and exporting read. Keep the one layout.
                quantized.support_avx512bf16_for_cpu = False
            else:
                quantized = bnb.nn.Linear8bitLt(
                    linear.in_features, linear.out_features, bias=True, has_fp16_weights=False
                )
                quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            quantized.register_forward_pre_hook(_input_in_run_precision)
            setattr(parent, child, quantized.to(device))
    # what HF's quantised models say of themselves: peft reads it to put its bitsandbytes layers (which
    # dequantise for DoRA and merges) on these linears instead of its plain ones
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = mode == "nf4", mode == "int8"


def _input_in_run_precision(module: nn.Module, args: tuple) -> tuple:
    """Under autocast, the run's precision (QLoRA computes in bf16): bitsandbytes' 4-bit matmul is not
    an autocast op, so a float32 input (a LayerNorm's output) would make it compute in float32. And the
    layer computes in its input's dtype at every call (bitsandbytes would keep the first call's)."""
    x = args[0]
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.is_floating_point() and x.dtype != torch.get_autocast_dtype(kind):
        x = x.to(torch.get_autocast_dtype(kind))
    if hasattr(module, "compute_type_is_set"):  # Linear4bit fixes its compute dtype at its first call otherwise
        module.compute_dtype, module.compute_type_is_set = x.dtype, True
    return (x, *args[1:])


def is_quantized(module: nn.Module) -> bool:
    kinds = _bnb_kinds()
    return bool(kinds) and isinstance(module, kinds)


def _bnb_kinds() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out, in) a quantised linear computes with."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "this NF4 weight was repacked by bitsandbytes for CPU inference (a CPU with AVX512-BF16): its "
                "float values cannot be read back here; export before evaluating on this CPU"
            )
        return bnb.functional.dequantize_4bit(module.weight.data, state).float()
    # after its first forward, bitsandbytes keeps the row scales on the layer's state, not the weight
    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return module.weight.data.float() * scales.float()[:, None] / 127.0


def storage_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy (a quantised weight at its packed size, plus
    its quantisation constants)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        scale = getattr(tensor, "SCB", None)
        if isinstance(scale, torch.Tensor):
            total += scale.numel() * scale.element_size()
    return total


def _state_tensors(state: Any) -> list[torch.Tensor]:
    found = [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    return found + (_state_tensors(nested) if nested is not None else [])
