"""LoRA training step, ours vs stock HF GPT-2 + peft (same targets, rank, weights), in one run.

gpt2-small width (768, 12 heads), few layers, B=8, T=128, LoRA r=8 on all four projections,
only adapters train (the base is frozen in both), AdamW, median of alternating steps.
Also ours with peft's own LoRA forward instead of the fused LoRA linear (modules/lora_linear.py), so
its share shows. Usage: python scripts/bench_lora.py [--layers 4] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch

from model import GPT2LMHeadModel
from model.trainable import build_optimizer, set_trainable
from modules.lora import peft_lora_config
from modules.lora_linear import unfuse_lora
from train.cli.exits import exit_status


def timed_step(loss_fn, optimizer, ids) -> float:
    start = time.perf_counter()
    loss_fn(ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_base = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=args.layers, n_head=12, n_embd=768, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        hf_base.save_pretrained(folder)
        ours = GPT2LMHeadModel.from_pretrained(
            folder, use_lora=True, lora_r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0
        )
    set_trainable(ours)
    unfused = copy.deepcopy(ours)
    unfuse_lora(unfused)
    hf = peft.get_peft_model(hf_base, peft_lora_config(ours.config, fan_in_fan_out=True))
    ours.train()
    unfused.train()
    hf.train()
    ours_opt = build_optimizer(ours, lr=1e-4)
    unfused_opt = build_optimizer(unfused, lr=1e-4)
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    hf_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert ours_trainable == hf_trainable, (ours_trainable, hf_trainable)
    ids = torch.randint(0, 50257, (8, 128))
    ours_loss = lambda x: ours(x, labels=x).loss
    hf_loss = lambda x: hf(input_ids=x, labels=x).loss
    unfused_loss = lambda x: unfused(x, labels=x).loss
    timed_step(ours_loss, ours_opt, ids)
    timed_step(unfused_loss, unfused_opt, ids)
    timed_step(hf_loss, hf_opt, ids)
    ours_t, unfused_t, hf_t = [], [], []
    for _ in range(args.steps):
        ours_t.append(timed_step(ours_loss, ours_opt, ids))
        unfused_t.append(timed_step(unfused_loss, unfused_opt, ids))
        hf_t.append(timed_step(hf_loss, hf_opt, ids))
    a, b, c = statistics.median(ours_t), statistics.median(hf_t), statistics.median(unfused_t)
    print(
        f"torch={torch.__version__} transformers={transformers.__version__} peft={peft.__version__} "
        f"threads={torch.get_num_threads()}; {args.layers} layers x 768, B=8, T=128, r={args.rank}, "
        f"{ours_trainable} trainable parameters in both"
    )
    print(
        f"LoRA train step   ours {a * 1e3:8.1f} ms   HF+peft {b * 1e3:8.1f} ms   ratio ours/HF = {a / b:.3f}"
        f"  (target <= 1.0)"
    )
    print(f"ours with peft's own LoRA forward {c * 1e3:8.1f} ms   fused / peft's forward = {a / c:.3f}")


if __name__ == "__main__":
    sys.exit(exit_status(main))
