"""The forked GPT-2: `GPT2Layer` (the block the variants change), `GPT2Model`, `GPT2LMHeadModel`.

    h_0 = dropout(wte[ids] + wpe[pos])
    h_l = h_{l-1} + attn(ln_1(h_{l-1}));  h_l = h_l + mlp(ln_2(h_l))        for l = 1..L
    logits = ln_f(h_L) wteᵀ                                                   (tied embeddings)

Parameter names equal Hugging Face's (`transformer.h.N.attn.c_attn`, ...), so checkpoints load by a
name map. Padding: `attention_mask` (B, T_total) with 1 for real tokens; masked keys are never
attended, and positions count real tokens only, so a left-padded sequence gives the same logits as
the sequence alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import adapters, loading
from model.config import GPT2Config
from model.generation import generate
from model.heads import lm_head_weight
from model.losses import linear_cross_entropy, next_token_targets
from model.quantize import is_quantized, quantize_block_linears
from model.shapes import bucket_length
from modules import registry
from modules.attention import CausalSelfAttention, KVCache, compute_dtype
from modules.kan import use_spline_kernel
from modules.mlp import MLP
from modules.registry import attach_variants
from modules.variant import ForwardChangeHost


@dataclass
class GPT2Output:
    last_hidden_state: torch.Tensor  # (B, T, C), after ln_f
    logits: torch.Tensor | None = None  # (B, T, V)
    loss: torch.Tensor | None = None  # next-token cross-entropy when labels were given


def validate_inputs(
    config: GPT2Config, input_ids: Any, attention_mask: Any, past: int, right_padded: bool = False
) -> bool:
    """Clear errors for bad input instead of an index error deep inside torch. Returns whether the
    mask pads anything. The value checks and that answer cost one host sync together.
    `right_padded`: also check that every row's padding follows its real tokens."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (seq_len 0)")
    total = past + input_ids.shape[1]
    if total > config.n_positions:
        raise ValueError(
            f"sequence length {total} exceeds the model's n_positions={config.n_positions}; truncate the input"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        expected = (input_ids.shape[0], total)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} (batch, past + seq_len)"
            )
    stats = [input_ids.min(), input_ids.max()]
    if attention_mask is not None:
        stats += [((attention_mask == 0) | (attention_mask == 1)).all(), attention_mask.all()]
        if right_padded:
            stats.append((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    lowest, highest, *mask_stats = torch.stack([v.long() for v in stats]).tolist()  # the one sync
    if right_padded and attention_mask is not None and not mask_stats[2]:
        raise ValueError("right_padded=True, but a row of attention_mask has a real token after padding")
    if lowest < 0 or highest >= config.vocab_size:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if mask_stats and not mask_stats[0]:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return bool(mask_stats) and not mask_stats[1]


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    q_len: int,
    past: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """SDPA mask (B, 1, q_len, past + q_len): boolean (True = may attend), or additive in `dtype` (0 or
    -inf; built once per forward in the compute dtype, so no layer converts it); None = plain causal.

    `padding_mask` is None when nothing is padded (the fused causal path then applies). Causal AND
    key-padding. A padded query row would otherwise mask every key (NaN in softmax), so every token
    may attend to itself; outputs at padded positions are meaningless but finite.
    """
    attention_mask = padding_mask
    if attention_mask is None:
        if past == 0 or q_len == 1:
            return None
        attention_mask = torch.ones(1, past + q_len, dtype=torch.bool, device=device)
    device = attention_mask.device
    keys = torch.arange(past + q_len, device=device)
    queries = torch.arange(past, past + q_len, device=device)
    causal = keys[None, :] <= queries[:, None]  # (Tq, Tk)
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    mask = mask | (keys[None, :] == queries[:, None])[None, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))


def position_ids_from_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device
) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + q_len, device=device)[None]
    # Count real tokens only, so left padding does not shift positions.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past : past + q_len]


class GPT2Layer(nn.Module):
    """One pre-LayerNorm transformer block; variants replace `attn` or `mlp` (or their linears)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.attn_pdrop, config.resid_pdrop)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, config.ffn_dim, config.resid_pdrop)
        # Extension slot: branches that run beside attention on ln_1(x) and add to the residual
        # (the graph branch). Empty by default, so the base path costs nothing.
        self.parallel_branches = nn.ModuleDict()  # keyed by variant name (its parameter namespace)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.ln_1(x)
        update = self.attn(h, attn_mask, kv_cache, layer_idx)
        for branch in self.parallel_branches.values():
            update = update + branch(h, padding_mask, kv_cache, layer_idx)
        x = x + update
        return x + self.mlp(self.ln_2(x))


class GPT2Model(ForwardChangeHost):
    """GPT-2's backbone; variants that change its forward pass attach through ForwardChangeHost."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Layer(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # Training-time switches (see --grad_checkpointing and --compile in train/cli/parse.py).
        self.gradient_checkpointing = False
        self.pad_to_multiple = 1  # >1: right-pad inputs so compiled blocks see few distinct lengths
        self.pad_to_bucket = False  # True: right-pad inputs to a bucket length (model/shapes.py)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        validate: bool = True,
        right_padded: bool = False,
    ) -> GPT2Output:
        """`right_padded=True` promises that every row's padding (mask 0) comes after its real tokens,
        as the training batches are collated. Under causal attention no real query can then see a
        padded key and real tokens sit at positions 0..n-1, so the stack runs the plain causal path
        (the fused kernel, no mask built, no branch filtering padding): exact at every real position,
        with no host sync. The mask stays the caller's to use (heads, the loss)."""
        past = kv_cache.length - kv_cache.prefix_length if kv_cache is not None else 0  # real tokens cached
        right_padded = right_padded and kv_cache is None and position_ids is None
        # Under torch.compile nothing here may read a tensor's value: no validation, and a given mask
        # is always applied. Eagerly, validation answers "is anything padded?" in the same sync;
        # generation validates the prompt once and passes no mask when nothing is padded.
        padded = attention_mask is not None
        if validate and not torch.compiler.is_compiling():
            padded = validate_inputs(self.config, input_ids, attention_mask, past, right_padded)
        if self.prefix is not None:
            if position_ids is not None:
                raise ValueError("position_ids with a prefix (virtual tokens): positions follow the prefix's rule")
            return self._forward_with_prefix(input_ids, attention_mask if padded else None, kv_cache)
        if right_padded:  # the stack needs no mask (the docstring says why)
            attention_mask, padded = None, False
        q_len = input_ids.shape[1]
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, q_len, past, input_ids.device)
        extra = 0
        if kv_cache is None:
            extra = (
                bucket_length(q_len, self.config.n_positions) - q_len
                if self.pad_to_bucket
                else (-q_len) % self.pad_to_multiple
            )
        if extra:  # right padding: causal attention keeps it invisible to the real tokens
            input_ids = nn.functional.pad(input_ids, (0, extra))
            position_ids = nn.functional.pad(position_ids.expand(input_ids.shape[0], -1), (0, extra))
            if not right_padded:
                attention_mask = nn.functional.pad(
                    attention_mask if attention_mask is not None else input_ids.new_ones(input_ids.shape[0], q_len),
                    (0, extra),
                )
                padded = True
        padding = attention_mask.bool() if padded else None
        mask = build_attention_mask(padding, q_len + extra, past, input_ids.device, compute_dtype(self.wte.weight))
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        x = self._layers(x, mask, kv_cache, padding)
        if kv_cache is not None:
            kv_cache.length += q_len
        return GPT2Output(last_hidden_state=self.ln_f(x[:, :q_len] if extra else x))

    def static_decode_blocker(self) -> str | None:
        """Why this model cannot decode with a static cache (None: it can). Variants that keep their own
        per-token state in the cache, or change what a step reads, decode eagerly."""
        reasons = (change.blockers()[0] for change in self.changes)
        if reason := next((reason for reason in reasons if reason), None):
            return reason
        if any(len(layer.parallel_branches) for layer in self.h):
            return "a parallel branch with its own cache (graph attention)"
        return None

    def decode_static(
        self, token: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        """One decoding step of fixed shapes: `token` and `positions` (B, 1), `mask` (B, 1, 1, max_len)
        the keys each row may read (its prompt's real tokens and every token written since, this one
        included), `kv_cache.slot` where this token's keys and values go. Returns ln_f's (B, 1, C)."""
        x = self.drop(self.wte(token) + self.wpe(positions))
        return self.ln_f(self._blocks(x, mask, kv_cache, None))

    def _layers(
        self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: Any, padding: torch.Tensor | None
    ) -> torch.Tensor:
        if (passes := self.passes) is not None:  # e.g. X-LoRA: a scaling pass, then the pass with its scalings
            return passes.run_blocks(lambda h, cache: self._blocks(h, mask, cache, padding), x, kv_cache, self.ln_f)
        return self._blocks(x, mask, kv_cache, padding)

    def _blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: Any, padding: torch.Tensor | None
    ) -> torch.Tensor:
        for index, layer in enumerate(self.h):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, kv_cache, index, padding, use_reentrant=False)
            elif isinstance(kv_cache, KVCache) and getattr(layer, "_compiled_call_impl", None) is not None:
                x = layer.forward(x, mask, kv_cache, index, padding)  # decoding runs eagerly (its shapes vary)
            else:
                x = layer(x, mask, kv_cache, index, padding)
        return x

    def _forward_with_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: KVCache | None
    ) -> GPT2Output:
        """A forward change's prefix (ForwardChange: e.g. prompt learning's virtual tokens) goes in front
        of the input, as embeddings or as the cache's first n keys/values, and only the input's own
        positions come out. The mask then covers past prefix, past real and new tokens; positions follow it."""
        change = self.prefix
        n, (batch, q_len) = change.prefix_length, input_ids.shape
        first = kv_cache is None or kv_cache.length == 0
        cached_real = kv_cache.length - kv_cache.prefix_length if kv_cache is not None else 0
        if n + cached_real + q_len > self.config.n_positions:
            raise ValueError(
                f"{n} virtual + {cached_real + q_len} real tokens exceed the model's "
                f"n_positions={self.config.n_positions}; truncate the input or use fewer virtual tokens"
            )
        if attention_mask is not None:  # the prefix is always attended
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        x = self.wte(input_ids)
        if first:
            embeddings = change.prefix_embeddings(batch)
            if embeddings is not None:
                x = torch.cat([embeddings.to(x.dtype), x], dim=1)
            else:
                kv_cache = change.prefix_cache(kv_cache, batch)
        past, seq = (kv_cache.length if kv_cache is not None else 0), x.shape[1]
        position_ids = position_ids_from_mask(attention_mask, seq, past, input_ids.device)
        padding = attention_mask.bool() if attention_mask is not None else None
        mask = build_attention_mask(padding, seq, past, input_ids.device, compute_dtype(self.wte.weight))
        x = self._layers(self.drop(x + self.wpe(position_ids)), mask, kv_cache, padding)
        if kv_cache is not None:
            kv_cache.length += seq
            kv_cache.prefix_length = n
        return GPT2Output(last_hidden_state=self.ln_f(x[:, -q_len:]))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the tied LM head. `GPT2LMHeadModel(config)` is randomly initialised (GPT-2's
    scheme); `GPT2LMHeadModel.from_pretrained(name_or_path)` loads a Hugging Face checkpoint."""

    def __init__(self, config: GPT2Config, with_variants: bool = True) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))
        # {parameter name: variant} for every parameter a variant added (what "adapters" mode trains).
        self.adapter_params: dict[str, str] = {}
        self.task_index: int | None = None  # the task being run (for_task), for variants that route by it
        # The LM-head loss's matmuls: False = at the run's precision (bf16 under bf16 autocast, as HF's LM
        # head), True = fp32 always (the trainer sets it from --loss_precision)
        self.lm_loss_fp32 = False
        if with_variants:
            self.apply_variants()

    def apply_variants(self) -> None:
        """Attach the variants the config enables (after the base weights are in place)."""
        if self.adapter_params:
            raise RuntimeError("variants are already attached to this model")
        reference = self.transformer.wte.weight
        if self.config.quantize is not None and not any(is_quantized(m) for m in self.modules()):
            quantize_block_linears(self, self.config.quantize)  # the base first: adapters wrap its layers
        self.adapter_params = attach_variants(self, self.config)
        # Variants build their modules on the CPU in float32; a model already on a GPU (or in float64
        # or bf16) would then mix devices or dtypes at the first forward.
        self.to(device=reference.device, dtype=reference.dtype)
        self.train(self.training)  # new modules start in train mode; follow the model's mode

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @contextlib.contextmanager
    def for_task(self, index: int | None) -> Iterator[None]:
        """Run the block for task `index` (train/tasks' order): variants that route by task (peft's
        poly) read it; the others ignore it."""
        previous, self.task_index = self.task_index, index
        try:
            yield
        finally:
            self.task_index = previous

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The variants' per-step hooks (AdaLoRA's rank allocator); call after optimizer.step(), before
        zero_grad(): they read the gradients. `step`: optimizer steps taken before this one."""
        registry.after_step(self, self.config, step, total_steps)

    def use_kan_kernel(self, kernel: str, device: str) -> int:
        """Run every KAN layer's spline GEMM with `kernel` (--kan_kernel: torch or triton); the layer count."""
        return use_spline_kernel(self, kernel, device)

    @property
    def has_step_hooks(self) -> bool:
        return registry.has_step_hooks(self.config)

    @property
    def capture_blocker(self) -> str | None:
        """Why CUDA graphs must not capture this model's forward (training or evaluation), or None."""
        reasons = (change.blockers()[1] for change in self.transformer.changes)
        if reason := next((reason for reason in reasons if reason), None):
            return reason
        if self.config.quantize is not None:
            return "a quantised base (bitsandbytes' kernels have not yet been run under CUDA graphs here)"
        return registry.capture_blocker(self, self.config)

    @property
    def needs_data_init(self) -> bool:
        """Whether a variant initialises itself from training data (EVA) before the first step."""
        return registry.needs_data_init(self.config)

    def initialize_from_data(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """The variants' data-driven initialisation; `batches`: dicts of input_ids and attention_mask."""
        registry.data_init(self, self.config, batches)

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """State outside the parameters that a training checkpoint must hold (tensors, JSON)."""
        return registry.training_state(self, self.config)

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        registry.load_training_state(self, self.config, tensors, meta)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The enabled variants' auxiliary losses summed (e.g. the KAN regulariser); None when none."""
        return registry.auxiliary_loss(self, self.config)

    def variant_state(self, checkpoints_only: bool = False) -> dict[str, torch.Tensor]:
        """Tensors the enabled variants save beside their parameters (KAN grids ...); `checkpoints_only`:
        those a training checkpoint must hold too (random frozen draws a rebuild would not reproduce)."""
        return registry.variant_state(self, self.config, checkpoints_only=checkpoints_only)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        validate: bool = True,
        right_padded: bool = False,
    ) -> GPT2Output:
        """`labels` (B, T) follow HF's convention (shifted inside; -100 ignored; padding positions are
        ignored too). With labels the loss goes through the fused LM-head cross-entropy and the full
        logits are not materialised unless `return_logits=True`. `validate=False` skips the input
        checks (and their host sync) for ids already checked; `right_padded`: see GPT2Model.forward."""
        out = self.transformer(
            input_ids, attention_mask, position_ids, kv_cache, validate=validate, right_padded=right_padded
        )
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
            targets = next_token_targets(input_ids, labels, attention_mask)
            hidden = out.last_hidden_state
            out.loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                lm_head_weight(self.lm_head),
                targets.reshape(-1),
                check=validate,
                fp32=self.lm_loss_fp32,
            )
        if return_logits or (return_logits is None and labels is None):
            out.logits = self.lm_head(out.last_hidden_state)
        return out

    # ---- loading, saving, generation (implemented beside this file) ----
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, strict: bool = True, config: GPT2Config | None = None, **config_overrides: Any
    ) -> GPT2LMHeadModel:
        """A Hugging Face GPT-2 checkpoint (hub id or folder) with `config_overrides` (variants, dropout ...),
        or with `config`, a config already resolved from this checkpoint (read once per run)."""
        return loading.load_pretrained(cls, name_or_path, strict=strict, config=config, **config_overrides)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a plain Hugging Face GPT-2 checkpoint (config.json + model.safetensors)."""
        loading.save_hf_checkpoint(self, directory)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return generate(self, input_ids, attention_mask, **kwargs)

    # ---- adapters: save / load / merge / export (model/adapters.py) ----
    def save_adapters(self, directory: str | Path) -> None:
        adapters.save_adapters(self, directory)

    def load_adapters(self, directory: str | Path) -> None:
        adapters.load_adapters(self, directory)

    def merge_adapters(self) -> None:
        adapters.merge_adapters(self)

    def export_hf(self, directory: str | Path) -> None:
        adapters.export_hf(self, directory)

    def export_peft(self, directory: str | Path) -> None:
        adapters.export_peft(self, directory)

    def num_parameters(self, trainable_only: bool = False) -> int:
        # parameters() yields the tied wte / lm_head weight once
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
