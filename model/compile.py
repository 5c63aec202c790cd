"""`--compile`: torch.compile each transformer block (with the fast step: one static graph per bucket
length; without it: inputs padded to a multiple of 64).

Why blocks, not the whole model: every task calls the backbone differently (LM loss, a classification
head on the last real token, generation with a KV cache), and the blocks are where the time goes.
The blocks are identical code, so dynamo compiles one graph and reuses it for every layer.
Decoding with a KV cache bypasses the compiled blocks (its shapes change every token).

Why pad: length bucketing gives batches of many different lengths; each new shape would be a
recompile. Right-padding to a multiple of `PAD_MULTIPLE` (invisible to real tokens under causal
attention, and trimmed from the output) bounds the shapes to n_positions / 64 lengths (16 at gpt2's
1024), and after the first recompile dynamo marks the changing sizes dynamic.
"""

from __future__ import annotations

import torch
from torch import nn

PAD_MULTIPLE = 64


def compile_blocks(model: nn.Module, backend: str = "inductor", static_shapes: bool = False) -> None:
    """Compile each block of `model.transformer` in place. `static_shapes=False`: pad its inputs to
    PAD_MULTIPLE. `static_shapes=True` (the fast step, whose batches already come in a few bucket
    lengths): no padding and one static graph per bucket; the fast step then captures the compiled
    kernels in its CUDA graphs."""
    if static_shapes:
        # One graph per bucket length (and per first/later block: block 0's input needs no gradient
        # under LoRA): at most 2 x 8 on a task, above dynamo's default limit of 8 recompiles. Not
        # dynamic=True: dynamo cannot trace the KAN spline's autograd.Function with symbolic sizes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for block in model.transformer.h:
        block.compile(backend=backend, dynamic=False if static_shapes else None)
    if static_shapes:  # training batches come bucketed; evaluation's are padded to the same buckets
        model.transformer.pad_to_bucket = True
    else:
        model.transformer.pad_to_multiple = PAD_MULTIPLE
