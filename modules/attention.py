"""Causal multi-head self-attention of GPT-2, through `F.scaled_dot_product_attention`.

    q, k, v = split(x W_attn + b_attn)                 # x: (B, T, C) -> 3 x (B, H, T, D)
    a = softmax(q kᵀ / sqrt(D) + mask) v               # mask: causal AND key padding
    out = merge_heads(a) W_proj + b_proj               # (B, T, C)

Parameter names follow Hugging Face (`c_attn`, `c_proj`) but are `nn.Linear` (weight: out x in);
HF's Conv1D stores the transpose, which the checkpoint loader handles. The mask is built once per
forward by the model (see `model.gpt2.build_attention_mask`) and shared by every layer; `None` means
"plain causal", which lets SDPA take its fused `is_causal` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype activations (so attention's q, k, v and the KV cache) have: autocast's when it is on
    for the weight's device, else the weight's own."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


class KVCache:
    """Pre-allocated key/value cache for incremental decoding: one (B, H, max_len, D) buffer pair
    per layer, written in place, so a decoding step costs O(T) instead of recomputing O(T²)."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, n_head, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.extras: dict = {}  # per-layer state of other branches (e.g. the graph branch's nodes)
        self.length = 0  # tokens already stored (same for every layer once a forward completes)
        self.prefix_length = 0  # of those, a forward change's prefix (modules/variant.py), ahead of the real ones
        # Static decoding (model/generation.py): the slot the next token is written to, as a device
        # tensor; a step then reads the whole buffer (its keys past the slot masked), so every step has
        # the same shapes and reads no Python int that changes.
        self.slot: torch.Tensor | None = None

    @classmethod
    def like(cls, other: KVCache) -> KVCache:
        """An empty cache of the same shape, dtype and device."""
        batch, n_head, max_len, head_dim = other.keys[0].shape
        return cls(len(other.keys), batch, n_head, max_len, head_dim, other.keys[0].dtype, other.keys[0].device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is not None:  # static decoding: one token into its slot, the whole buffer back
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        # Extension slot: adapters that read the attention input and adjust the fused qkv (KoRA).
        # Empty by default, so the base path costs nothing.
        self.qkv_adapters = nn.ModuleDict()  # keyed by variant name (its parameter namespace)
        self.attn_pdrop = attn_pdrop
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        for adapter in self.qkv_adapters.values():
            qkv = adapter(x, qkv)
        if torch.is_autocast_enabled(qkv.device.type):
            # Some adapted projections (peft's VeRA and LoHa) answer in float32 under autocast; attention
            # then runs in the run's precision anyway (the flash kernel, as for every other method).
            qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
        # (B, T, 3, H, D) -> 3 x (B, H, T, D)
        q, k, v = qkv.view(batch, seq, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer_idx, k, v)
        # Without an explicit mask the fused causal kernel applies; a single query token attending
        # to a cached past needs no mask at all.
        # Without a cache a one-token input is causal either way, so the flag needs no look at the length
        # (which is symbolic under torch.compile with dynamic shapes, and SDPA wants a plain bool).
        is_causal = attn_mask is None and (kv_cache is None or seq > 1)
        if is_causal and past > 0:
            raise ValueError("a multi-token step on a non-empty KV cache needs an explicit attention mask")
        a = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.attn_pdrop if self.training else 0.0,
        )
        a = a.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.c_proj(a))
