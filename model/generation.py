"""Batched generation with a pre-allocated KV cache (one forward of the prompt, then one token/step).

Returns the prompt followed by the new tokens, as Hugging Face's `generate` does; a sequence that
emitted `eos_token_id` is continued with `pad_token_id` (default: the EOS id) until all are done.
Batches use LEFT padding so every sequence's next token sits in the last column.

The KV cache is allocated in the compute dtype (bf16 under bf16 autocast: half the memory of fp32).
Sampling with `row_seeds` gives every row its own random stream (inverse-CDF sampling with uniforms
drawn per row), so a row's sample does not depend on which rows share its batch or its process.
Whether every row has finished is read every `FINISHED_CHECK_EVERY` tokens (each read is a host sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modules.attention import KVCache, compute_dtype

FINISHED_CHECK_EVERY = 8


def row_uniforms(row_seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(B, steps) uniforms in [0, 1), row r drawn from its own generator seeded `row_seeds[r]`."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in row_seeds]
    return torch.stack(rows).to(device)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (B, V) `probs`: the first index whose cumulative mass exceeds u·total."""
    cdf = probs.double().cumsum(-1)
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp(max=probs.shape[-1] - 1)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering on (B, V) logits; removed entries become -inf."""
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(
    model: Any, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    virtual = model.config.prefix_positions  # the KV cache holds them ahead of the prompt
    total = virtual + input_ids.shape[-1] + max_new_tokens
    if total > model.config.n_positions:
        counted = f"{virtual} virtual tokens + " if virtual else ""
        raise ValueError(
            f"{counted}prompt ({input_ids.shape[-1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"n_positions={model.config.n_positions}"
        )


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = 50256,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    row_seeds: Sequence[int] | None = None,
    static_cache: bool = False,
    output_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`generator` drives `torch.multinomial` for the whole batch; `row_seeds` (one per row) instead
    gives each row its own stream, independent of the batch it is in. `static_cache=True`: after the
    prompt, every step has the same shapes (`GPT2Model.decode_static`: the whole cache buffer read
    under a mask, the token's slot and positions as device tensors), what a captured decode step
    needs; the same tokens as the default path in fp32, the same logits to bf16 rounding under bf16
    (tested). Models whose variants keep their own cache state (`static_decode_blocker`) decode the
    default way. `output_scores=True` also returns each step's logits, (B, steps, V) in fp32."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    if row_seeds is not None and len(row_seeds) != input_ids.shape[0]:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {input_ids.shape[0]} rows")
    if attention_mask is not None:
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs LEFT-padded batches: the last column of attention_mask has padding")
        if bool(attention_mask.all()):
            attention_mask = None  # nothing padded: every step takes the fused causal path
    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    was_training = model.training
    model.eval()
    batch, prompt_len = input_ids.shape
    config = model.config
    cache = KVCache(
        config.n_layer,
        batch,
        config.n_head,
        config.prefix_positions + prompt_len + max_new_tokens,
        config.head_dim,
        compute_dtype(model.transformer.wte.weight),
        input_ids.device,
    )
    uniforms = row_uniforms(row_seeds, max_new_tokens, input_ids.device) if do_sample and row_seeds else None
    mask = attention_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens, scores = [], []
    step_input = input_ids
    static = static_cache and model.transformer.static_decode_blocker() is None
    try:
        for step in range(max_new_tokens):
            if step == 0 or not static:
                # The prompt is validated; later inputs are argmax/sampled ids within the checked length.
                out = model.transformer(step_input, mask, kv_cache=cache, validate=step == 0)
                hidden = out.last_hidden_state[:, -1]
                if static:
                    slot, positions, keys = static_state(cache, attention_mask, batch, prompt_len)
            else:
                keys.index_fill_(1, slot, True)  # this step's own key
                hidden = model.transformer.decode_static(step_input, positions, keys[:, None, None, :], cache)[:, -1]
                slot.add_(1)
                positions.add_(1)
            logits = model.lm_head(hidden).float()  # (B, V): only the last position's logits
            if output_scores:
                scores.append(logits)
            if do_sample:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                if uniforms is not None:
                    next_token = sample_inverse_cdf(probs, uniforms[:, step])
                else:
                    next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_token = logits.argmax(-1)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
                finished |= next_token == eos_token_id
            new_tokens.append(next_token)
            if eos_token_id is not None and (step + 1) % FINISHED_CHECK_EVERY == 0 and bool(finished.all()):
                break
            step_input = next_token[:, None]
            if mask is not None and not static:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    finally:
        model.train(was_training)
    tokens = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    return (tokens, torch.stack(scores, dim=1)) if output_scores else tokens


def static_state(
    cache: KVCache, prompt_mask: torch.Tensor | None, batch: int, prompt_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After the prompt's forward: (the slot of the next token, (1,); each row's next position, (B, 1);
    the keys each row may read, (B, max_len)). The unwritten part of the cache is zeroed: masked keys
    still enter attention's matmuls, where uninitialised memory could hold NaN."""
    device = cache.keys[0].device
    for buffer in (*cache.keys, *cache.values):
        buffer[:, :, prompt_len:].zero_()
    keys = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=device)
    if prompt_mask is None:
        keys[:, :prompt_len] = True
        positions = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
    else:  # left padding: a row's real tokens sit at positions 0..n-1
        keys[:, :prompt_len] = prompt_mask.bool()
        positions = prompt_mask.long().sum(1, keepdim=True)
    cache.slot = torch.tensor([prompt_len], dtype=torch.long, device=device)
    return cache.slot, positions, keys
