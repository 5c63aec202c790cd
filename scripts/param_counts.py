"""Trainable and total parameters of each variant at a given size (default: full gpt2, 124M).

Counts are exact: each variant is built at that size on the meta device (shapes only, no memory)
and its default fine_tune_mode set is counted (task heads excluded). Usage:
    python scripts/param_counts.py [--preset gpt2]
"""

from __future__ import annotations

import argparse
import sys

import torch

from model import GPT2Config, GPT2LMHeadModel
from model.trainable import set_trainable
from train.cli.exits import exit_status

VARIANTS: dict[str, dict] = {
    "base (full fine-tuning)": {},
    "LoRA r=8 (all 4 targets)": dict(use_lora=True),
    "rsLoRA r=8": dict(use_lora=True, lora_rslora=True),
    "DoRA r=8": dict(use_lora=True, lora_dora=True),
    "LoRA r=8, qkv only": dict(use_lora=True, lora_targets=("qkv",)),
    "KoRA r=8, d_comp=64": dict(use_kora=True),
    "LoRA r=8 + KoRA": dict(use_lora=True, use_kora=True),
    "LoRA-XS r=8 (all 4 targets)": dict(use_lora_xs=True),
    "AntiPaSTO r=8, blocks of 4": dict(use_antipasto=True),
}


def count(preset: str, knobs: dict) -> tuple[int, int]:
    """(trainable, total) parameters of a variant at a size preset."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config.from_preset(preset, **knobs))
    counts = set_trainable(model)
    return counts["trainable"], counts["total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="gpt2")
    args = parser.parse_args()
    print(f"| variant ({args.preset}) | trainable | total | trainable % |")
    print("|---|---:|---:|---:|")
    for name, knobs in VARIANTS.items():
        trainable, total = count(args.preset, knobs)
        print(f"| {name} | {trainable:,} | {total:,} | {100 * trainable / total:.3f}% |")


if __name__ == "__main__":
    sys.exit(exit_status(main))
