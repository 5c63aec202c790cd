"""One row per variant: trainable and total parameters and added MACs per token at full gpt2 size,
forward and forward+backward time and saved-activation memory at gpt2-small width (few layers).

Parameters are exact (each variant is built on the meta device at gpt2 size). Added MACs per token
are analytic (per token, all 12 layers, over the base model's ~85M non-embedding MACs + 38.6M for the
LM head). Timing: B x T tokens through `--layers` blocks of width 768 in `fine_tune_mode=adapters`
(full-model for the base), dropout 0, median of `--repeats`. Memory: bytes autograd saves for
backward (the activation memory between forward and backward), measured with saved-tensor hooks.
Usage: python scripts/bench_variants.py [--layers 2] [--batch 4] [--seq 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import GPT2Config, GPT2LMHeadModel  # noqa: E402
from model.trainable import set_trainable  # noqa: E402
from modules.kan_ffn import matched_hidden_width  # noqa: E402
from scripts.bench_utils import median_time, saved_activation_bytes  # noqa: E402
from scripts.param_counts import count  # noqa: E402

VARIANTS: dict[str, dict] = {
    "base (full fine-tuning)": {},
    "LoRA r=8": dict(use_lora=True),
    "rsLoRA r=8": dict(use_lora=True, lora_rslora=True),
    "DoRA r=8": dict(use_lora=True, lora_dora=True),
    "KoRA r=8, d_comp=64": dict(use_kora=True),
    "KAN-FFN, mlp init (G=5, k=3)": dict(use_kan=True),
    "KAN-FFN, param-matched random": dict(use_kan=True, kan_init="random"),
    "LoRA-KAN r=8 (G=5, k=3)": dict(use_lora=True, use_kan=True),
    "graph, GATConv backend": dict(use_graph=True),
    "graph, dense backend": dict(use_graph=True, graph_backend="dense"),
}


def added_macs_per_token(c: GPT2Config, seq: int) -> int:
    """Analytic multiply-accumulates per token that the variant adds to GPT-2 (all layers)."""
    width, ffn, rank = c.n_embd, c.ffn_dim, c.lora_r
    targets = {"qkv": (width, 3 * width), "attn_out": (width, width), "mlp_in": (width, ffn), "mlp_out": (ffn, width)}
    per_layer = 0
    bases = c.kan_grid_size + c.kan_spline_order
    if c.use_lora and not c.use_kan:
        per_layer += sum(rank * (i + o) for t, (i, o) in targets.items() if t in c.lora_targets)
    if c.use_lora and c.use_kan:
        per_layer += sum((1 + bases) * rank * (i + o) for t, (i, o) in targets.items() if t in c.lora_targets)
    if c.use_kan and not c.use_lora:
        if c.kan_init == "mlp":
            per_layer += bases * 2 * width * ffn
        else:
            hidden = c.kan_hidden or matched_hidden_width(width, ffn, c.kan_grid_size, c.kan_spline_order)
            per_layer += (1 + bases) * 2 * width * hidden - 2 * width * ffn
    if c.use_kora:
        per_layer += 3 * c.kora_r * width * 2 + 3 * width * c.kora_d_comp + c.kora_d_comp * width
    if c.use_graph:
        keys = seq if c.graph_window is None else min(seq, c.graph_window)
        per_layer += width * width + 2 * width + (keys + 1) // 2 * width * 2  # z = hW, scores, aggregation (causal)
    return per_layer * c.n_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_default_device(args.device)  # every module and input below is built there
    torch.set_num_threads(args.threads)
    no_dropout = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, lora_dropout=0.0, graph_dropout=0.0)
    ids = torch.randint(0, 50257, (args.batch, args.seq))
    warm = GPT2LMHeadModel(GPT2Config.from_preset("gpt2", n_layer=args.layers, **no_dropout))
    for _ in range(2):  # first-touch allocations and thread-pool start-up, so row 1 is not penalised
        warm(ids, labels=ids).loss.backward()
    del warm
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()}; params/MACs at gpt2 (12 x 768); timing at "
        f"768 width, {args.layers} layers, B={args.batch}, T={args.seq}"
    )
    print(
        "| variant | trainable (gpt2) | total (gpt2) | added MACs/token (gpt2) | fwd ms | fwd+bwd ms | "
        "saved activations |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, knobs in VARIANTS.items():
        full = GPT2Config.from_preset("gpt2", **knobs)
        trainable, total = count("gpt2", knobs)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2", n_layer=args.layers, **no_dropout, **knobs)).train()
        set_trainable(model)

        def forward(m=model):
            with torch.no_grad():
                m(ids, labels=ids)

        def train_step(m=model):
            m.zero_grad(set_to_none=True)
            m(ids, labels=ids).loss.backward()

        t_fwd = median_time(forward, args.repeats, device=args.device)
        t_step = median_time(train_step, args.repeats, device=args.device)
        saved = saved_activation_bytes(lambda m=model: m(ids, labels=ids).loss)
        print(
            f"| {name} | {trainable:,} | {total:,} | {added_macs_per_token(full, args.seq):,} | "
            f"{t_fwd * 1e3:.0f} | {t_step * 1e3:.0f} | {saved / 2**20:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
