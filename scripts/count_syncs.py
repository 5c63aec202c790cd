"""Host syncs and torch.compile graph breaks of one training forward+backward, and host syncs per
generated token, for the base model and the variants (CPU stand-in for a GPU profile).

A host sync is an op that makes the CPU wait for the device's result: `aten._local_scalar_dense`
(`.item()`, `bool(t)`, `int(t)`) and the data-dependent-shape ops `nonzero` / `masked_select` /
boolean indexing. Counted with a TorchDispatchMode, so the numbers are the same on any device.
Usage: python scripts/count_syncs.py [--layers 2]
"""

from __future__ import annotations

import argparse
import sys

import torch

from model import GPT2Config, GPT2LMHeadModel
from train.cli.exits import exit_status
from train.trainer.graphs import SyncCounter

VARIANTS = {"base": {}, "LoRA": {"use_lora": True}, "graph": {"use_graph": True}, "KAN-FFN": {"use_kan": True}}


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (4, 48), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -7:] = 0  # right padding, as in a sonnet batch
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print("| variant | host syncs per fwd+bwd (padded batch) | graph breaks (training forward) | syncs per token |")
    print("|---|---:|---:|---:|")
    for name, knobs in VARIANTS.items():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=args.layers, n_head=2, n_embd=32, n_positions=128, vocab_size=1000, **knobs)
        model = GPT2LMHeadModel(config).train()
        ids, mask = batch()
        with SyncCounter() as counter:
            model(ids, attention_mask=mask, labels=ids).loss.backward()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda m=model, i=ids, a=mask: m(i, attention_mask=a, labels=i).loss)()
        breaks = explained.graph_break_count
        model.eval()
        with SyncCounter() as generation:
            model.generate(ids[:, :8], max_new_tokens=32, eos_token_id=999)  # an EOS that never comes
        per_token = sum(generation.counts.values()) / 32
        print(f"| {name} | {sum(counter.counts.values())} ({dict(counter.counts)}) | {breaks} | {per_token:.2f} |")


if __name__ == "__main__":
    sys.exit(exit_status(main))
