"""LoRA's linear as one autograd function that does only LoRA's work: peft's maths, fewer kernels.

    y     = x Wᵀ + b + s · (d Aᵀ) Bᵀ            d = dropout(x)  (d is x itself when dropout is off)
    dL/dx = g W + s · (g B) A                    (the second term through dropout's mask when it is on)
    dL/dA = s · (g B)ᵀ d        dL/dB = s · gᵀ (d Aᵀ)        W and b frozen: no gradient is computed

The low-rank product is added into the base GEMM's output in place (`addmm_`), and dL/dx is built the
same way; dL/dx is skipped when the input needs no gradient (the first adapted layer of a frozen
model). peft's `lora.Linear.forward` computes the same sum as three separate linears, keeps every
intermediate for autograd and, for a frozen W, still materialises its input's share of the graph.

Identity at init is peft's: B = 0, so y = x Wᵀ + b exactly. The function computes in the run's
precision: the autocast dtype under autocast (bf16 in a bf16 run, where peft's linears would each be
autocast), else the input's; gradients return in each input's own dtype.

Which layers: every peft `lora.Linear` of the LoRA variant and of `peft_method="lora"` gets this forward
(`use_fused_lora`). At each call it runs only in the case it was written for: one active adapter, not
merged or disabled, vanilla LoRA (no DoRA or other lora variant, no LoRA bias), a plain `nn.Linear`
base whose weight and bias are frozen, no extra arguments. Anything else runs peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scale: float, dtype: torch.dtype):
        xs = x.to(dtype)
        ds = xs if dropped is None else dropped.to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        h = ds @ a.t()  # (N, r)
        y = torch.addmm(bias.to(dtype), xs, w.t()) if bias is not None else xs @ w.t()
        y.addmm_(h, b.t(), alpha=scale)  # the low-rank path folded into the base GEMM's output
        # only what backward reads: W for dL/dx, d for dL/dA (the first adapted layer of a frozen model
        # needs no dL/dx, so its W is not kept)
        ctx.save_for_backward(ds if ctx.needs_input_grad[4] else None, w if ctx.needs_input_grad[0] else None, a, b, h)
        ctx.scale, ctx.same, ctx.compute_dtype = scale, dropped is None, dtype
        ctx.dtypes = x.dtype, None if dropped is None else dropped.dtype, lora_a.dtype, lora_b.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        ds, w, a, b, h = ctx.saved_tensors
        x_dtype, d_dtype, a_dtype, b_dtype = ctx.dtypes
        need_x, need_d, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        g = grad_y.to(ctx.compute_dtype)
        gb = g @ b  # (N, r): shared by dL/dA and the low-rank share of dL/dx
        grad_x = grad_d = grad_a = grad_b = None
        if need_a:
            grad_a = (ctx.scale * (gb.t() @ ds)).to(a_dtype)
        if need_b:
            grad_b = (ctx.scale * (g.t() @ h)).to(b_dtype)
        if ctx.same and need_x:  # d = x: one dL/dx, the low-rank share added in place
            grad_x = (g @ w).addmm_(gb, a, alpha=ctx.scale).to(x_dtype)
        else:
            if need_x:
                grad_x = (g @ w).to(x_dtype)
            if need_d:  # through the dropout mask, which autograd applies on its way to x
                grad_d = (ctx.scale * (gb @ a)).to(d_dtype)
        return grad_x, grad_d, None, None, grad_a, grad_b, None, None


def fused_applies(layer: Any, args: tuple, kwargs: dict) -> str | None:
    """The adapter the fused forward runs for this call, or None where peft's own forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or layer.lora_B[adapter].bias is not None:
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    return adapter


def fused_forward(layer: Any, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """peft's LoRA sum for one adapter through `_LoRALinear` (see the module docstring)."""
    dropout = layer.lora_dropout[adapter]
    active = layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0
    # dropout on x as peft applies it (before any reshape: a non-contiguous x keeps peft's mask order)
    dropped = dropout(x).reshape(-1, x.shape[-1]) if active else None
    flat = x.reshape(-1, x.shape[-1])
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    base = layer.base_layer
    with torch.autocast(kind, enabled=False):  # the dtypes are explicit inside
        y = _LoRALinear.apply(
            flat,
            dropped,
            base.weight,
            base.bias,
            layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight,
            float(layer.scaling[adapter]),
            dtype,
        )
    return y.reshape(*x.shape[:-1], y.shape[-1])


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(peft_linear: type) -> type:
    """peft's `lora.Linear` with the fused forward (a subclass, so peft still recognises its layers)."""
    if peft_linear not in _FUSED_CLASSES:

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            adapter = fused_applies(self, args, kwargs)
            if adapter is None:
                return peft_linear.forward(self, x, *args, **kwargs)
            return fused_forward(self, x, adapter)

        fused = type("FusedLoraLinear", (peft_linear,), {"forward": forward, "__module__": __name__})
        globals()["FusedLoraLinear"] = fused  # found by name: a model holding these layers pickles
        _FUSED_CLASSES[peft_linear] = fused
    return _FUSED_CLASSES[peft_linear]


def use_fused_lora(model: nn.Module) -> int:
    """Give every peft `lora.Linear` in `model` the fused forward; returns how many layers got it."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = _fused_class(PeftLoraLinear)
            count += 1
    return count


def unfuse_lora(model: nn.Module) -> None:
    """Put peft's own forward back (the reference the tests compare against)."""
    for module in model.modules():
        for peft_linear, fused in _FUSED_CLASSES.items():
            if type(module) is fused:
                module.__class__ = peft_linear
