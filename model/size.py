"""How big a model a config describes, known before anything is built, so a config that cannot fit is
refused in one line instead of allocating until the machine runs out of memory.

* `stack_parameters`: the plain GPT-2 stack's parameter count in closed form (token and position
  embeddings V·d + P·d, per block 4d² + 2d·f + 9d + f with f the FFN width, the final LayerNorm 2d; the
  LM head is tied). gpt2 gives 124,439,808. `ModelSettings` refuses a stack above `STACK_LIMIT`
  parameters on every path (a checkpoint's own config.json included), whatever the device.
* `estimate`: total and trainable parameters with the variants on, counted exactly by building the
  model on the meta device (shapes only, no memory) at depth 1 and 2 and extrapolating per block, so
  `--lora_r 1000000` or a peft `r` of 10^8 is counted in milliseconds. A peft method whose set-up reads
  weight values cannot be built on meta: it is counted as the plain stack.
* `check_fits`: the static training memory (fp32 weights 4 B per parameter, plus 12 B per trainable
  parameter for its gradient and AdamW's two moments; the arithmetic of scripts/gpu_fit.py) against the
  device's memory. Activations come on top, so passing this check is necessary, not sufficient.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from modules.variant import no_weight_init

STACK_LIMIT = 2**40  # ~1.1e12 parameters (4 TiB in fp32): no config of this project is near it


def stack_parameters(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_inner: int | None) -> int:
    d = n_embd
    f = n_inner or 4 * d
    block = 4 * d * d + 2 * d * f + 9 * d + f
    return vocab_size * d + n_positions * d + n_layer * block + 2 * d


QUANTIZED_BYTES = {"nf4": 0.5, "int8": 1.0}  # bytes a quantised base weight takes (constants aside)


@dataclass(frozen=True)
class Estimate:
    total: int
    trainable: int
    quantized: int = 0  # of `total`, the frozen block weights a quantised base stores in fewer bytes
    quantized_bytes: float = 4.0

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

    from model.gpt2 import GPT2LMHeadModel
    from model.trainable import set_trainable

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
    return Estimate(found.total, found.trainable, block_linear_weights(config), QUANTIZED_BYTES[config.quantize])


def _estimate(config: Any) -> Estimate:
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


def check_fits(config: Any, device: str) -> Estimate:
    """ValueError naming the estimate when the static training memory exceeds the device's memory."""
    found = estimate(config)
    memory = device_memory(device)
    if memory is not None and found.static_bytes > memory:
        raise ValueError(
            f"this model cannot train on {device}: {found.total:,} parameters ({found.trainable:,} trained) need "
            f"about {found.static_bytes / 2**30:,.1f} GiB for weights, gradients and AdamW state (estimated "
            f"from the config, before activations), and {device} has {memory / 2**30:,.1f} GiB. Use a smaller "
            "rank or model, or a device with more memory"
        )
    return found
