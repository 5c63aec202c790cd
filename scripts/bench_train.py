"""Training throughput (tokens/s) and peak memory per variant, through the real training loop.

Each variant trains in its own process (so peak RSS is its own) with `python -m train.sentiment`
on SST, from a randomly initialised gpt2-small-shaped checkpoint (width 768, 12 heads, `--layers`
blocks, full vocabulary), batch 8, for `--steps` optimizer steps; throughput is the median of the
per-step tokens/s the loop logs (first step excluded), peak memory is what the run's metrics.json
reports (CUDA: max allocated; CPU: peak RSS of the process, model and data included).
Usage: python scripts/bench_train.py --data_dir ../shared/data/cs224n --tokenizer ../shared/tokenizer/gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from train.cli.exits import exit_status

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "base (full fine-tuning)": [],
    "LoRA r=8": ["--use_lora"],
    "LoRA-KAN r=8": ["--use_lora", "--use_kan"],
    "KAN-FFN (mlp init)": ["--use_kan"],
    "KoRA r=8": ["--use_kora"],
    "graph (GATConv)": ["--use_graph"],
    "graph (dense)": ["--use_graph", "--graph_backend", "dense"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=args.layers, n_head=12, n_embd=768)
        ).save_pretrained(f"{tmp}/ckpt")
        print(f"device={args.device}; gpt2-small width, {args.layers} layers, SST batch 8, {args.steps} steps")
        print("| variant | tokens/s | peak memory (MiB) | trainable parameters |")
        print("|---|---:|---:|---:|")
        for name, flags in VARIANTS.items():
            out = f"{tmp}/runs-{len(flags)}-{abs(hash(name))}"
            cmd = [
                sys.executable,
                "-m",
                "train.sentiment",
                "--dataset",
                "sst",
                "--model",
                f"{tmp}/ckpt",
                "--tokenizer",
                args.tokenizer,
                "--data_dir",
                args.data_dir,
                "--out_dir",
                out,
                "--train_limit",
                str(8 * args.steps),
                "--dev_limit",
                "8",
                "--test_limit",
                "8",
                "--batch_size",
                "8",
                "--max_steps",
                str(args.steps),
                "--wandb",
                "disabled",
                "--device",
                args.device,
                *flags,
            ]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                print(f"| {name} | failed: {done.stderr[-300:]} | | |")
                continue
            run_dir = next(p for p in Path(out).iterdir() if p.is_dir())
            log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            rates = [e["train/tokens_per_s"] for e in log if "train/tokens_per_s" in e][1:]
            metrics = json.loads((run_dir / "metrics.json").read_text())
            trainable = json.loads((run_dir / "config.json").read_text())["parameters"]["trainable"]
            print(
                f"| {name} | {statistics.median(rates):.0f} | {metrics['peak_memory_mb']:.0f} | {trainable:,} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(exit_status(main))
