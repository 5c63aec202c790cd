"""Static shapes: the few sequence lengths the fast step, its CUDA graphs and compiled blocks see.

A batch pads to the smallest bucket that holds its longest sequence (or to the cap, the task's
maximum length or the model's context), so a whole epoch sees at most len(LENGTH_BUCKETS) + 1
distinct lengths, each captured (or compiled) once. Used by the batching (datasets/batching.py), by
the model's input padding under --compile (model/compile.py) and by evaluation's CUDA graphs.
"""

from __future__ import annotations

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


def bucket_length(longest: int, cap: int) -> int:
    """The static length a batch whose longest sequence is `longest` pads to (never above `cap`)."""
    if longest > cap:
        raise ValueError(f"a sequence of {longest} tokens is longer than the cap {cap}")
    return min([b for b in LENGTH_BUCKETS if b >= longest] + [cap])


def static_lengths(cap: int) -> list[int]:
    """Every length `bucket_length` can return under `cap` (the documented bound on distinct shapes)."""
    return sorted({bucket_length(n, cap) for n in range(1, cap + 1)})
