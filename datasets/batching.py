"""Tokenisation and batching: truncation with a count, length-bucketed batches, padding accounting.

Pad token = EOS (GPT-2 has no pad token); the attention mask marks real tokens. Length bucketing
groups examples of similar length (sorted inside shuffled pools of `pool_batches` batches), so a
batch pads to a length close to its members' and the padding fraction stays low.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.shapes import LENGTH_BUCKETS, bucket_length, static_lengths  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
PAD_ID = 50256


@dataclass
class Encoded:
    ids: list[list[int]]
    truncated: int  # how many examples were cut to max_length


def encode(tokenizer, texts: Sequence[str], max_length: int, truncation_side: str = "right") -> Encoded:
    """Token ids per text, cut to `max_length` (keeping the start, or the end with side="left")."""
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    ids, truncated = [], 0
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        if len(encoded) > max_length:
            truncated += 1
            encoded = encoded[:max_length] if truncation_side == "right" else encoded[-max_length:]
        if not encoded:
            encoded = [PAD_ID]  # an empty text still gets one (masked-in) token
        ids.append(encoded)
    if truncated:
        log.info("truncated %d of %d examples to %d tokens", truncated, len(ids), max_length)
    return Encoded(ids, truncated)


def make_batches(
    lengths: Sequence[int],
    batch_size: int,
    bucket: bool = True,
    shuffle: bool = False,
    seed: int = 0,
    pool_batches: int = 50,
) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        pool = batch_size * pool_batches
        order = [
            i
            for start in range(0, len(order), pool)
            for i in sorted(order[start : start + pool], key=lambda j: lengths[j])
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(
    sequences: Sequence[Sequence[int]],
    side: str = "right",
    pad_id: int = PAD_ID,
    length: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest), padded on `side`. Static shapes: `length` pads
    to that many positions, `rows` adds all-padding rows (mask 0) up to that batch size."""
    longest = max(len(s) for s in sequences)
    if length is not None:
        if length < longest:
            raise ValueError(f"length {length} is shorter than the batch's longest sequence ({longest})")
        longest = length
    if rows is not None and rows < len(sequences):
        raise ValueError(f"rows {rows} is fewer than the batch's {len(sequences)} sequences")
    count = rows or len(sequences)
    ids = torch.full((count, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((count, longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        else:
            ids[row, longest - len(seq) :] = torch.tensor(seq)
            mask[row, longest - len(seq) :] = 1
    return ids, mask


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the token slots in padded batches that are padding."""
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0
