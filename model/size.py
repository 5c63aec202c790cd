"""How big a model a config describes, known before anything is built, so a config that cannot fit is
refused in one line instead of allocating until the machine runs out of memory.

* `stack_parameters` (defined in model/config.py, which checks it): the plain GPT-2 stack's parameter
  count in closed form (token and position embeddings V·d + P·d, per block 4d² + 2d·f + 9d + f with f
  the FFN width, the final LayerNorm 2d; the LM head is tied). gpt2 gives 124,439,808. `ModelSettings`
  refuses a stack above `STACK_LIMIT` parameters on every path (a checkpoint's own config.json
  included), whatever the device.
* `estimate`: total and trainable parameters with the variants on, counted exactly by building the
  model on the meta device (shapes only, no memory) at depth 1 and 2 and extrapolating per block, so
  `--lora_r 1000000` or a peft `r` of 10^8 is counted in milliseconds. A peft method whose set-up reads
  weight values cannot be built on meta: it is counted as the plain stack.
* `activations`: what a training step keeps for backward, counted on the meta device: the tensors
  autograd saves (parameters excluded) in a forward of 2 and of 4 tokens, at depth 1 and 2, fitted as
  fixed + per-token bytes and extrapolated per block. A LoRA of rank 10^6 keeps a rank-wide
  intermediate per token and adapted linear (15 MiB a token per block on the tiny preset): its
  weights alone fit in 24 GiB, its activations do not.
* `check_fits`: the static training memory (fp32 weights 4 B per parameter, plus 12 B per trainable
  parameter for its gradient and AdamW's two moments; the arithmetic of scripts/gpu_fit.py) plus the
  activations of a step's tokens against the device's memory. Attention's T² terms and the allocator's
  slack come on top, so passing this check is necessary, not sufficient.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any
from unittest import mock

from model.config import STACK_LIMIT, stack_parameters  # noqa: F401 - part of this module's face
from model.gpt2 import GPT2LMHeadModel
from model.trainable import set_trainable
from modules.variant import no_weight_init

QUANTIZED_BYTES = {"nf4": 0.5, "int8": 1.0}  # bytes a quantised base weight takes (constants aside)


@dataclass(frozen=True)
class Estimate:
    total: int
    trainable: int
    quantized: int = 0  # of `total`, the frozen block weights a quantised base stores in fewer bytes
    quantized_bytes: float = 4.0
    activation_fixed: int = 0  # bytes a step keeps for backward whatever its length (`activations`)
    activation_per_token: int = 0

    def activation_bytes(self, tokens: int) -> int:
        return self.activation_fixed + self.activation_per_token * tokens

    @property
    def static_bytes(self) -> int:
        floats = self.total - self.quantized
        return int(4 * floats + self.quantized_bytes * self.quantized + 12 * self.trainable)


def block_linear_weights(config: Any) -> int:
    """The weights of every block's four linears: what `--quantize` stores quantised."""
    d, f = config.n_embd, config.n_inner or 4 * config.n_embd
    return config.n_layer * (4 * d * d + 2 * d * f)


def _count(config: Any) -> tuple[int, int]:
    import torch

    with torch.device("meta"), no_weight_init():
        model = GPT2LMHeadModel(config)
    mode = config.resolved_fine_tune_mode
    if mode == "last-linear-layer":  # only the task head trains (a few thousand parameters)
        return sum(p.numel() for p in model.parameters()), 0
    counts = set_trainable(model, mode)
    return counts["total"], counts["trainable"]


_ESTIMATES: dict[str, Estimate] = {}  # by the config's JSON: a grid plans each model once per task and seed


def estimate(config: Any) -> Estimate:
    """Total and trainable parameters of `config` with its variants (task heads excluded); with a
    quantised base, its block weights at their quantised size."""
    unquantized = config.replace(quantize=None) if config.quantize is not None else config
    key = json.dumps(unquantized.to_dict(), sort_keys=True, default=repr)
    found = _ESTIMATES.get(key)
    if found is None:
        if len(_ESTIMATES) >= 1024:
            _ESTIMATES.clear()
        found = _ESTIMATES[key] = _estimate(unquantized)
    if config.quantize is None:
        return found
    return Estimate(
        found.total,
        found.trainable,
        block_linear_weights(config),
        QUANTIZED_BYTES[config.quantize],
        found.activation_fixed,
        found.activation_per_token,
    )


class _NoAutocast(contextlib.nullcontext):
    """torch.autocast for the meta device, which autocast does not know (the forward is shapes only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()


def _saved_bytes(config: Any, tokens: int) -> int:
    """Bytes autograd saves for backward in one forward of a 1 x `tokens` batch (parameters and buffers
    excluded: they are counted as weights), on the meta device."""
    import torch

    with torch.device("meta"), no_weight_init():
        model = GPT2LMHeadModel(config)
    set_trainable(model, config.resolved_fine_tune_mode)
    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    saved = [0]

    def pack(tensor):
        if id(tensor) not in weights and id(tensor._base) not in weights:
            saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    no_autocast = (
        mock.patch.object(torch, "autocast", _NoAutocast),
        mock.patch.object(torch, "is_autocast_enabled", lambda *args: False),
        mock.patch.object(torch, "get_autocast_dtype", lambda *args: torch.float32),
    )
    with no_autocast[0], no_autocast[1], no_autocast[2], torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, validate=False, right_padded=True)  # no value checks: meta tensors hold none
    return saved[0]


def activations(config: Any) -> tuple[int, int]:
    """(fixed, per-token) bytes a training step keeps for backward; (0, 0) when the forward cannot run
    on the meta device or only a task head trains."""
    if config.resolved_fine_tune_mode == "last-linear-layer":
        return 0, 0
    try:
        depths = (1, min(2, config.n_layer))
        counts = {(d, t): _saved_bytes(config.replace(n_layer=d), t) for d in depths for t in (2, 4)}
    except Exception:  # noqa: BLE001 - a method whose forward reads values: no activation term
        return 0, 0

    def fit(depth: int) -> tuple[int, int]:
        per_token = max(0, counts[depth, 4] - counts[depth, 2]) // 2
        return max(0, counts[depth, 2] - 2 * per_token), per_token

    one, two = fit(1), fit(depths[1])
    extra = config.n_layer - 1
    if config.n_layer == 1:
        return one
    return one[0] + extra * max(0, two[0] - one[0]), one[1] + extra * max(0, two[1] - one[1])


def _estimate(config: Any) -> Estimate:
    counted = _estimate_parameters(config)
    return Estimate(counted.total, counted.trainable, 0, 4.0, *activations(config))


def _estimate_parameters(config: Any) -> Estimate:
    try:
        one, two = _count(config.replace(n_layer=1)), _count(config.replace(n_layer=min(2, config.n_layer)))
    except Exception:  # noqa: BLE001 - e.g. a peft config naming layer 5 of 12: build it whole
        try:
            return Estimate(*_count(config))
        except Exception:  # noqa: BLE001 - a method whose init reads weight values cannot run on meta:
            # count the plain stack (its adapters are small next to it), trained when the mode says so
            stack = stack_parameters(
                config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_inner
            )
            return Estimate(stack, stack if config.resolved_fine_tune_mode == "full-model" else 0)
    per_block = (two[0] - one[0], two[1] - one[1]) if config.n_layer > 1 else (0, 0)
    extra = config.n_layer - 1
    return Estimate(one[0] + extra * per_block[0], one[1] + extra * per_block[1])


def device_memory(device: str) -> int | None:
    """Bytes of memory of `device` (a CUDA GPU's, else this machine's RAM); None when it cannot be asked
    (then nothing is refused: the check is a guard, not a gate)."""
    try:
        if device.startswith("cuda"):
            import torch

            index = int(device.partition(":")[2] or 0)
            return torch.cuda.get_device_properties(index).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AssertionError, RuntimeError, ValueError, OSError):  # e.g. a CPU-only torch asked about CUDA
        return None


def check_fits(config: Any, device: str, tokens_per_step: int = 0, precision: str = "fp32") -> Estimate:
    """ValueError naming the estimate when the training memory (static, plus the activations of a step of
    `tokens_per_step` tokens; counted in float32, half that in a bf16 run) exceeds the device's memory."""
    found = estimate(config)
    memory = device_memory(device)
    kept = found.activation_bytes(tokens_per_step) // (2 if precision == "bf16" else 1)
    if memory is not None and found.static_bytes + kept > memory:
        raise ValueError(
            f"this model cannot train on {device}: {found.total:,} parameters ({found.trainable:,} trained) need "
            f"about {found.static_bytes / 2**30:,.1f} GiB for weights, gradients and AdamW state, and a step of "
            f"{tokens_per_step:,} tokens keeps about {kept / 2**30:,.1f} GiB of activations (estimated from the "
            f"config), while {device} has {memory / 2**30:,.1f} GiB. Use a smaller rank, model or batch, or a "
            "device with more memory"
        )
    return found
