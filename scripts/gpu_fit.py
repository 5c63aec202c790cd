"""Which model sizes and variants fit one GPU for training, from parameter/optimizer arithmetic.

Static training memory (what does not shrink with the batch) under this project's defaults:
fp32 weights (bf16 autocast keeps fp32 master weights) = 4 B x total parameters, plus for every
trainable parameter its fp32 gradient and AdamW's two moments = 12 B. Activations come on top and
scale with batch x length; `--grad_checkpointing` cuts them to about one block's worth. A run is
marked "fits" when the static memory leaves at least a quarter of the GPU for activations.
Parameters are counted exactly on the meta device (no memory). No FSDP: what does not fit needs
a smaller variant, LoRA, or more memory.
Usage: python scripts/gpu_fit.py [--gpu_gb 80]
"""

from __future__ import annotations

import argparse
import sys

from scripts.param_counts import count
from train.cli.exits import exit_status

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
VARIANTS = {
    "full fine-tuning": {},
    "LoRA r=8": dict(use_lora=True),
    "LoRA-KAN r=8": dict(use_kan=True, use_lora=True),
    "KAN-FFN (mlp init)": dict(use_kan=True),
    "KAN-FFN (param-matched random)": dict(use_kan=True, kan_init="random"),
    "graph + LoRA": dict(use_graph=True, use_lora=True),
}


def static_gib(trainable: int, total: int) -> float:
    return (4 * total + 12 * trainable) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu_gb", type=float, default=80.0, help="GPU memory in GB (default: %(default)s)")
    args = parser.parse_args()
    budget = args.gpu_gb * 1e9 / 2**30
    print(f"| variant | {' | '.join(SIZES)} |")
    print("|---|" + "---:|" * len(SIZES))
    for name, knobs in VARIANTS.items():
        cells = []
        for size in SIZES:
            trainable, total = count(size, knobs)
            need = static_gib(trainable, total)
            verdict = "fits" if need <= 0.75 * budget else ("tight" if need <= budget else "**needs more**")
            cells.append(f"{need:.1f} GiB ({trainable / 1e6:,.0f}M trained) {verdict}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    sys.exit(exit_status(main))
