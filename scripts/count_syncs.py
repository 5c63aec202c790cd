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
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import GPT2Config, GPT2LMHeadModel  # noqa: E402

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select"}
VARIANTS = {"base": {}, "LoRA": {"use_lora": True}, "graph": {"use_graph": True}, "KAN-FFN": {"use_kan": True}}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in ("index", "index_put_", "index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.counts["boolean index"] += 1  # its output shape is the mask's count: a sync
        return func(*args, **(kwargs or {}))


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
    main()
