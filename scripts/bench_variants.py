"""One cost table for every variant and every supported peft method, with ratios to plain LoRA.

Per row, at full gpt2 size (12 x 768, built on the CPU): trainable and total parameters; added
multiply-accumulates per token, counted with `torch.utils.flop_counter.FlopCounterMode` (matmul-like
ops only: elementwise scaling such as IA3's is not counted) for one forward of B=1 x T=`--seq`
tokens over the base model's, and for our own variants also the analytic count (a cross-check);
one-time init seconds (attaching the variant to a built model: PiSSA's SVD, FRoD's decomposition,
KAN's least-squares fit from the MLP; EVA's incremental SVD over 8 batches of 4 x 128 random ids).
At gpt2-small width with `--layers` blocks, B x T tokens: forward and forward+backward ms in
`fine_tune_mode=adapters` (full-model for the base), dropout 0, median of `--repeats`, and the bytes
autograd saves for backward (saved-tensor hooks). Ratios: forward+backward time and trainable
parameters over plain LoRA r=8's, measured in the same run.
Usage: python scripts/bench_variants.py [--layers 2] [--batch 4] [--seq 128] [--threads 2] [--only TEXT]"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from tqdm import tqdm

from model import GPT2Config, GPT2LMHeadModel
from model.trainable import set_trainable
from modules.kan_ffn import matched_hidden_width
from modules.peft_methods import METHODS, STANDALONE
from scripts.bench_utils import median_time, saved_activation_bytes
from train.cli.exits import exit_status

LORA_ROW = "LoRA r=8"
OWN: dict[str, dict] = {
    "base (full fine-tuning)": {},
    LORA_ROW: dict(use_lora=True),
    "rsLoRA r=8": dict(use_lora=True, lora_rslora=True),
    "DoRA r=8": dict(use_lora=True, lora_dora=True),
    "PiSSA r=8": dict(use_lora=True, lora_init="pissa"),
    "LoRA+ r=8 (ratio 16; optimizer-side)": dict(use_lora=True, lora_plus_ratio=16.0),
    "KoRA r=8, d_comp=64": dict(use_kora=True),
    "KAN-FFN, mlp init (G=5, k=3)": dict(use_kan=True),
    "KAN-FFN, param-matched random": dict(use_kan=True, kan_init="random"),
    "LoRA-KAN r=8 (G=5, k=3)": dict(use_lora=True, use_kan=True),
    "KOLMG-DoRA r=8 (G=5, k=3)": dict(use_lora=True, use_kan=True, lora_dora=True),
    "graph, GATConv backend": dict(use_graph=True),
    "graph, dense backend": dict(use_graph=True, graph_backend="dense"),
    "graph (dense) + LoRA r=8": dict(use_graph=True, graph_backend="dense", use_lora=True),
    "LoRA-XS r=8": dict(use_lora_xs=True),
    "AntiPaSTO r=8 (blocks of 4)": dict(use_antipasto=True),
    # QLoRA: LoRA r=8 on a base whose block linears are NF4 (model/quantize.py; its "total" counts the
    # packed 4-bit weights as stored, two per byte)
    "QLoRA r=8 (NF4 base)": dict(use_lora=True, quantize="nf4"),
}
# each at peft's defaults (plus the fields peft has no default for: each record's `required`)
PEFT = {f"peft {m}": dict(peft_method=m, peft_config=METHODS[m].required or None) for m in STANDALONE}
# EVA: peft's LoRA (r=8) with A from the SVD of each layer's inputs; its init reads EVA_BATCHES batches
PEFT["peft lora + EVA init"] = dict(peft_method="lora", peft_config={"init_lora_weights": "eva"})
# X-LoRA: three random LoRA r=8 experts (c_attn, c_proj, c_fc), written as peft adapter folders for the
# row's depth (random_experts); init counts reading and hashing them, and the classifier's build
PEFT["peft xlora (3 LoRA r=8 experts)"] = dict(peft_method="xlora", peft_config={"adapters": "random:3"})
EVA_BATCHES = (8, 4, 128)  # batches x rows x tokens of random ids (the runs read the task's training data)
VARIANTS = {**OWN, **PEFT}


def added_macs_per_token(c: GPT2Config, seq: int) -> int:
    """Analytic multiply-accumulates per token that the variant adds to GPT-2 (all layers)."""
    width, ffn, rank = c.n_embd, c.ffn_dim, c.lora_r
    targets = {"qkv": (width, 3 * width), "attn_out": (width, width), "mlp_in": (width, ffn), "mlp_out": (ffn, width)}
    per_layer = 0
    bases = c.kan_grid_size + c.kan_spline_order
    if c.use_lora and not c.use_kan:
        per_layer += sum(rank * (i + o) for t, (i, o) in targets.items() if t in c.lora_targets)
    if c.use_lora and c.use_kan:  # (KOLMG-DoRA's magnitude is one elementwise scale: no MACs)
        per_layer += sum((1 + bases) * rank * (i + o) for t, (i, o) in targets.items() if t in c.lora_targets)
    if c.use_kan and not c.use_lora:
        if c.kan_init == "mlp":
            per_layer += bases * 2 * width * ffn
        else:
            hidden = c.kan_hidden or matched_hidden_width(width, ffn, c.kan_grid_size, c.kan_spline_order)
            per_layer += (1 + bases) * 2 * width * hidden - 2 * width * ffn
    if c.use_kora:
        per_layer += 3 * c.kora_r * width * 2 + 3 * width * c.kora_d_comp + c.kora_d_comp * width
    if c.use_lora_xs:  # V_rᵀ x, the r×r core, U_r (·)
        per_layer += sum(
            c.lora_xs_r * (i + o) + c.lora_xs_r**2 for t, (i, o) in targets.items() if t in c.lora_xs_targets
        )
    if c.use_antipasto:  # V_rᵀ x, the block rotation, U_r (·)
        r, b = c.antipasto_r, c.antipasto_block
        per_layer += sum(r * (i + o) + r * b for t, (i, o) in targets.items() if t in c.antipasto_targets)
    if c.use_graph:
        keys = seq if c.graph_window is None else min(seq, c.graph_window)
        per_layer += width * width + 2 * width + (keys + 1) // 2 * width * 2  # z = hW, scores, aggregation (causal)
    return per_layer * c.n_layer


def random_experts(knobs: dict, n_layer: int) -> dict:
    """`knobs` with X-LoRA's "random:K" replaced by K random LoRA r=8 adapter folders for gpt2 width and
    `n_layer` blocks (peft's format; written once per depth to a temporary folder)."""
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    adapters = (knobs.get("peft_config") or {}).get("adapters")
    if not (isinstance(adapters, str) and adapters.startswith("random:")):
        return knobs
    shapes = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}
    root = Path(tempfile.gettempdir()) / f"bench-xlora-experts-{n_layer}"
    folders = {}
    for k in range(int(adapters.removeprefix("random:"))):
        folder = root / f"expert{k}"
        if not (folder / "adapter_model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(k)
            tensors = {}
            for block in range(n_layer):
                for name, (fan_in, fan_out) in shapes.items():
                    key = f"base_model.model.transformer.h.{block}.{name}"
                    tensors[f"{key}.lora_A.weight"] = torch.randn(8, fan_in, generator=generator) / fan_in**0.5
                    tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, 8, generator=generator) * 0.01
            save_file(tensors, folder / "adapter_model.safetensors")
            (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
        folders[f"expert{k}"] = str(folder)
    return {**knobs, "peft_config": {**knobs["peft_config"], "adapters": folders}}


def full_size_costs(knobs: dict, seq: int) -> dict:
    """Parameters, init seconds and counted forward FLOPs (B=1, T=seq) of the variant at gpt2 size."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    knobs = random_experts(knobs, 12)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2", **knobs), with_variants=False).eval()
    start = time.perf_counter()
    model.apply_variants()
    if model.needs_data_init:  # EVA: its SVD over the batches is part of its one-time cost
        count, rows, tokens = EVA_BATCHES
        ids = torch.randint(0, 50257, (count, rows, tokens), generator=torch.Generator().manual_seed(0))
        model.initialize_from_data([{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids])
    init_seconds = time.perf_counter() - start
    counts = set_trainable(model)
    model.task_index = 0  # as an SST run (variants that route by task: peft's poly)
    ids = torch.zeros(1, seq, dtype=torch.long)
    # frozen rather than no_grad: the counter's module tracker trips over outputs that require grad
    # without a grad_fn under no_grad (GLoRA)
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(ids)
    return {**counts, "init": init_seconds, "flops": counter.get_total_flops()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="timing device: cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", default=None, help="rows whose name contains TEXT (comma-separated: any of them; LoRA always runs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # peft's per-method notices would interleave with the table
    wanted = None if args.only is None else args.only.split(",")
    rows = {n: k for n, k in VARIANTS.items() if wanted is None or any(w in n for w in wanted) or n == LORA_ROW}
    for knobs in (dict(use_lora=True), dict(peft_method="ia3")):  # import peft once, outside the init timings
        GPT2LMHeadModel(GPT2Config.from_preset("tiny", **knobs))
    base_flops = full_size_costs({}, args.seq)["flops"]
    no_dropout = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, lora_dropout=0.0, graph_dropout=0.0)
    ids = torch.randint(0, 50257, (args.batch, args.seq), device=args.device)
    warm = GPT2LMHeadModel(GPT2Config.from_preset("gpt2", n_layer=args.layers, **no_dropout)).to(args.device)
    for _ in range(2):  # first-touch allocations and thread-pool start-up, so row 1 is not penalised
        warm(ids, labels=ids).loss.backward()
    del warm
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()}; params, MACs and init at gpt2 (12 x 768, "
        f"CPU; MACs for B=1, T={args.seq}); timing on {args.device} at 768 width, {args.layers} layers, "
        f"B={args.batch}, T={args.seq}"
    )
    print(
        "| variant | trainable (gpt2) | × LoRA | total (gpt2) | added MACs/token counted | analytic | init s | "
        "fwd ms | fwd+bwd ms | × LoRA | saved activations |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    lora = measure(OWN[LORA_ROW], args, ids, base_flops, no_dropout)  # the ratios' reference, first
    for name, knobs in tqdm(rows.items(), desc="variants", file=sys.stderr, leave=False):
        try:
            r = lora if name == LORA_ROW else measure(knobs, args, ids, base_flops, no_dropout)
        except Exception as error:  # noqa: BLE001 - one method failing must not lose the table
            print(f"| {name} | error: {type(error).__name__}: {str(error)[:100]} |", flush=True)
            continue
        analytic = "—" if r["analytic"] is None else f"{r['analytic']:,}"
        counted = "—" if r["counted"] is None else f"{r['counted']:,}"
        print(
            f"| {name} | {r['trainable']:,} | {r['trainable'] / lora['trainable']:.2f} | {r['total']:,} | "
            f"{counted} | {analytic} | {r['init']:.2f} | {r['fwd'] * 1e3:.0f} | {r['step'] * 1e3:.0f} | "
            f"{r['step'] / lora['step']:.2f} | {r['saved'] / 2**20:.0f} MiB |",
            flush=True,
        )


def measure(knobs: dict, args: argparse.Namespace, ids: torch.Tensor, base_flops: int, no_dropout: dict) -> dict:
    full = full_size_costs(knobs, args.seq)
    torch.manual_seed(0)
    config = GPT2Config.from_preset("gpt2", n_layer=args.layers, **no_dropout, **random_experts(knobs, args.layers))
    model = GPT2LMHeadModel(config).to(args.device).train()
    model.task_index = 0  # as an SST run (variants that route by task: peft's poly)
    set_trainable(model)

    def forward():
        with torch.no_grad():
            model(ids, labels=ids)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    own = "peft_method" not in knobs
    return dict(
        trainable=full["trainable"],
        total=full["total"],
        # bitsandbytes' 4-bit matmuls are not matmul ops the counter knows: no count for a quantised base
        counted=None if knobs.get("quantize") else (full["flops"] - base_flops) // 2 // args.seq,
        analytic=added_macs_per_token(GPT2Config.from_preset("gpt2", **knobs), args.seq) if own else None,
        init=full["init"],
        fwd=median_time(forward, args.repeats, device=args.device),
        step=median_time(train_step, args.repeats, device=args.device),
        saved=saved_activation_bytes(lambda: model(ids, labels=ids).loss),
    )


if __name__ == "__main__":
    sys.exit(exit_status(main))
