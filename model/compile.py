"""`--compile`: torch.compile each transformer block, with inputs padded to a multiple of 64.

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

from torch import nn

PAD_MULTIPLE = 64


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block of `model.transformer` in place and pad its inputs to PAD_MULTIPLE."""
    for block in model.transformer.h:
        block.compile(backend=backend)
    model.transformer.pad_to_multiple = PAD_MULTIPLE
