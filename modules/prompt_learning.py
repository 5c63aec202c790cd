"""Prompt learning through peft's own encoders: `peft_method="prompt_tuning" | "p_tuning" | "prefix_tuning"`.

    prompt tuning   h_0 = [P ; wte[x]] + wpe(pos)            P (n × C): n trained virtual-token embeddings
    P-tuning        h_0 = [f(P) ; wte[x]] + wpe(pos)         f: peft's MLP or LSTM re-parameterisation of P
    prefix tuning   attn_l(q) = softmax(q [K_l^P ; K_l]ᵀ / √d) [V_l^P ; V_l]
                                                           K_l^P, V_l^P (n × C per layer): trained keys and
                                                           values fed to every layer through the KV cache

The base weights stay frozen; only P (and P-tuning's encoder, prefix tuning's optional projection)
train. The encoders are peft's classes (`PromptEmbedding`, `PromptEncoder`, `PrefixEncoder`) built from
peft's configs, so the initialisation options (`prompt_tuning_init`, `encoder_reparameterization_type`,
`prefix_projection`, ...) are peft's.

Positions. Virtual tokens take positions 0..n−1; real tokens count from n over real tokens only, so
left padding does not shift them (the model's rule without virtual tokens). For unpadded and
right-padded input this is peft's convention: HF GPT-2 numbers peft's [P ; input] embeddings 0..n+T−1,
and prefix tuning's cache of n entries starts the real tokens at n.

Everything downstream sees only the real tokens: `GPT2Model` prepends the virtual tokens (or fills the
cache with the prefix) and returns hidden states for the input's own T positions. The padding mask is
extended over the virtual tokens (always attended), the heads read the last real token, the sonnet
loss covers the same positions as without virtual tokens, and generation keeps the virtual tokens in
its KV cache (`KVCache.prefix_length`).

Identity at init: no. The virtual tokens are attended from the first step (a zero prefix still takes
softmax mass), so the adapted model differs from the base at init; the method table says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modules.variant import ForwardChange, LrPrior, PeftMethod

DEFAULT_VIRTUAL_TOKENS = 20  # peft's examples for GPT-2-sized models; `num_virtual_tokens` overrides it
_MC = "peft's method comparison (method_comparison/MetaMathQA)"


def _prompt_method(name: str, lr: LrPrior) -> PeftMethod:
    return PeftMethod(
        name,
        "prompt",
        lr,
        defaults={"num_virtual_tokens": DEFAULT_VIRTUAL_TOKENS},
        not_identity_at_init=(
            "virtual tokens are attended from the first step, so outputs change at init (no zero update exists)"
        ),
        not_mergeable="virtual tokens are extra inputs, not a change to any weight",
        quantized_base=True,  # the linears are left alone
    )


METHODS = (
    _prompt_method("p_tuning", LrPrior(1e-4, 5e-3, f"{_MC}: experiments/ptuning sweeps 5e-5, 5e-4, 1e-3 and 5e-3")),
    _prompt_method("prefix_tuning", LrPrior(1e-3, 1e-2, f"{_MC}: three experiments/prefixtuning runs set 5e-3")),
    _prompt_method(
        "prompt_tuning",
        LrPrior(
            1e-3,
            3e-1,
            "prompt tuning (Lester et al., 2021) trains at 0.3 (T5, Adafactor); "
            f"{_MC} sets 1e-3 (sample_vocab) and fails at 1e-4 (GSM8K 0.05)",
        ),
    ),
)
PROMPT_METHODS = tuple(method.name for method in METHODS)


def num_virtual_tokens(config: Any) -> int:
    """How many positions the config's virtual tokens take (0 without prompt learning)."""
    if getattr(config, "peft_method", None) not in PROMPT_METHODS:
        return 0
    return int((config.peft_config or {}).get("num_virtual_tokens", DEFAULT_VIRTUAL_TOKENS))


def derived_fields(config: Any) -> dict[str, Any]:
    """The peft config fields that describe the model, not the method: set from GPT2Config."""
    return {
        "num_layers": config.n_layer,
        "token_dim": config.n_embd,
        "num_attention_heads": config.n_head,
        "num_transformer_submodules": 1,
    }


class PrefixCache:
    """A training-time stand-in for `KVCache` that holds the prefix's keys and values and concatenates
    each layer's new keys and values after them (out of place, so gradients reach the prefix)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = pairs
        self.length = self.prefix_length = pairs[0][0].shape[2]
        self.extras: dict = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix_k, prefix_v = self.pairs[layer]
        return torch.cat([prefix_k.to(k.dtype), k], dim=2), torch.cat([prefix_v.to(v.dtype), v], dim=2)


class VirtualTokens(ForwardChange):
    """peft's prompt encoder (`self.peft`, the `peft` parameter namespace) and how its output enters
    GPT-2 (the ForwardChange hooks): as a prefix of input embeddings (`kind == "embeddings"`) or of
    per-layer keys and values (`"prefix"`)."""

    decode_blocker = "prompt learning's virtual tokens"
    capture_blocker = "prompt learning's virtual tokens (that path has not yet been run under CUDA graphs on a GPU)"

    def __init__(self, encoder: nn.Module, method: str, num_virtual_tokens: int, config: Any) -> None:
        super().__init__()
        self.peft = encoder
        self.method = method
        self.kind = "prefix" if method == "prefix_tuning" else "embeddings"
        self.num_virtual_tokens = self.prefix_length = num_virtual_tokens
        self.n_layer, self.n_head, self.head_dim = config.n_layer, config.n_head, config.n_embd // config.n_head
        self.register_buffer("indices", torch.arange(num_virtual_tokens), persistent=False)

    def encode(self) -> torch.Tensor:
        # One row, expanded over the batch by the callers: the encoders hold no dropout by default, so
        # every row gets the same virtual tokens, as in peft (which encodes batch copies of one index row).
        # In float32 outside autocast: the encoder is tiny, and oneDNN has no bf16 LSTM (P-tuning's) on
        # CPU; the virtual tokens join the stream in its dtype (the embeddings are float32, the keys and
        # values are cast to the attention's dtype).
        with torch.autocast(self.indices.device.type, enabled=False):
            return self.peft(self.indices[None])  # (1, n, C) or (1, n, 2 L C)

    def prefix_embeddings(self, batch: int) -> torch.Tensor | None:
        return self.encode().expand(batch, -1, -1) if self.kind == "embeddings" else None

    def prefix(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (B, H, n, D), laid out as peft's get_prompt lays them out."""
        n = self.num_virtual_tokens
        kv = self.encode().view(1, n, 2 * self.n_layer, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        kv = kv.expand(-1, batch, -1, -1, -1)  # (2L, B, H, n, D)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.n_layer)]

    def prefix_cache(self, kv_cache: Any, batch: int) -> Any:
        """The prefix as the cache every layer reads: written into a generation `KVCache` (its first n
        slots), or a `PrefixCache` for a forward without one."""
        pairs = self.prefix(batch)
        if kv_cache is None:
            return PrefixCache(pairs)
        n = self.num_virtual_tokens
        for layer, (k, v) in enumerate(pairs):
            kv_cache.keys[layer][:, :, :n] = k
            kv_cache.values[layer][:, :, :n] = v
        kv_cache.length = kv_cache.prefix_length = n
        return kv_cache


def build_encoder(model: nn.Module, peft_config: Any) -> nn.Module:
    """peft's encoder for the config (PromptEmbedding reads the word embeddings for its vocab inits)."""
    from peft.tuners import PrefixEncoder, PromptEmbedding, PromptEncoder

    method = peft_config.peft_type.value.lower()
    if method == "prompt_tuning":
        return PromptEmbedding(peft_config, model.transformer.wte)
    if method == "p_tuning":
        return PromptEncoder(peft_config)
    return PrefixEncoder(peft_config)


def attach_virtual_tokens(model: nn.Module, config: Any, peft_config: Any) -> None:
    encoder = build_encoder(model, peft_config)
    method = peft_config.peft_type.value.lower()
    model.transformer.add_forward_change(
        "virtual_tokens", VirtualTokens(encoder, method, peft_config.num_virtual_tokens, config)
    )


def check_virtual_tokens(config: Any, peft_config: Any) -> None:
    n = peft_config.num_virtual_tokens
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"peft {config.peft_method}: num_virtual_tokens must be an integer >= 1, got {n!r}")
    if n >= config.n_positions:
        raise ValueError(
            f"peft {config.peft_method}: num_virtual_tokens={n} leaves no position for real tokens "
            f"(n_positions={config.n_positions})"
        )
    if config.use_graph:
        raise ValueError(
            f"peft {config.peft_method} with use_graph: the graph branch builds its token graph over the "
            "input's own tokens and does not see virtual tokens; use one of them"
        )
    for key, value in derived_fields(config).items():
        if getattr(peft_config, key) != value:
            raise ValueError(
                f"peft_config.{key}={getattr(peft_config, key)} does not match this model ({key}={value}); "
                "leave it out, it is set from the model"
            )


def export_state(model: nn.Module, wrapped: Any) -> None:
    """Copy our encoder into a stock `PeftModel`'s (peft then saves its output as `prompt_embeddings`)."""
    ours = model.transformer.virtual_tokens.peft.state_dict()
    wrapped.prompt_encoder["default"].load_state_dict(ours, strict=True)
