"""Memory of a quantised base (--quantize nf4 | int8) against the float base, at a GPT-2 size.

Builds the model on the CPU with random weights (sizes, not results), quantises the blocks' linears
as a run does, and reports the bytes its parameters and buffers occupy (a packed 4-bit weight at its
packed size plus its quantisation constants), split into the blocks and the rest (embeddings, tied
LM head, final LayerNorm, which stay float32), with LoRA r=8 attached as in a QLoRA run.
Usage: python scripts/bench_quantize.py [--size gpt2-xl] [--modes none nf4 int8]"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from model import GPT2Config, GPT2LMHeadModel
from model.quantize import storage_bytes
from train.cli.exits import exit_status


def measure(size: str, mode: str | None) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    model = GPT2LMHeadModel(GPT2Config.from_preset(size, quantize=mode, use_lora=True))
    seconds = time.perf_counter() - started
    blocks = storage_bytes(model.transformer.h)
    total = storage_bytes(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    with torch.no_grad():
        finite = bool(torch.isfinite(model(ids).logits).all())
    del model
    gc.collect()
    return {"blocks": blocks, "total": total, "lora": lora, "build_s": seconds, "finite": finite}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="gpt2-xl")
    parser.add_argument("--modes", nargs="+", default=["none", "nf4", "int8"])
    args = parser.parse_args()
    rows = {mode: measure(args.size, None if mode == "none" else mode) for mode in args.modes}
    reference = rows.get("none")
    print(f"{args.size}, LoRA r=8 attached, random weights, CPU (torch {torch.__version__})")
    print("| base | blocks (GiB) | whole model (GiB) | × float | LoRA params | build + quantise s | finite logits |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode, r in rows.items():
        ratio = f"{r['total'] / reference['total']:.2f}" if reference else "—"
        print(
            f"| {mode} | {r['blocks'] / 2**30:.2f} | {r['total'] / 2**30:.2f} | {ratio} | {r['lora']:,} | "
            f"{r['build_s']:.0f} | {r['finite']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
