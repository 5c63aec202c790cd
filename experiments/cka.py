"""Linear centred kernel alignment (CKA; Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited", eq. for linear kernels) between two activation matrices, and a CLI that
compares the blocks of one model (KoRA's figure) or of two models.

    CKA(X, Y) = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F · ‖Yᶜᵀ Yᶜ‖_F)        Xᶜ, Yᶜ: columns centred over the n rows

It equals HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with linear kernels K = X Xᵀ, L = Y Yᵀ. It is 1
for identical inputs, symmetric, and invariant to orthogonal transforms and isotropic scaling of
either input, but not to a general invertible linear map (that is the point of the measure).

    python -m experiments.cka RUN_A [RUN_B] --task sst --layers 0 6 11 --n 512 --out DIR

RUN_A / RUN_B: a training run folder (its best checkpoint: base model, variants, trained weights), a
local Hugging Face GPT-2 folder or a hub id (e.g. a run against its base model). The first `--n` dev
examples of `--task` go through each model; the residual stream after each listed block (the
block's output) is read at the last real token and mean-pooled over the real tokens. `cka.json`
holds, per pooling, the block x block CKA matrix within each model and, with two models, the
matrix between them (A's block i vs B's block j), plus `summary`: the mean CKA over the pairs of
distinct listed blocks within each model (KoRA reports this for blocks 0, 6 and 11) and the mean of
the between-model diagonal. `cka.png` draws every matrix as a heatmap.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import torch

from train.base import console
from train.cli.exits import exit_status

REPO = Path(__file__).resolve().parents[1]

POOLINGS = ("last_token", "mean")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, d_x) and (n, d_y) activation matrices (rows = the same n examples),
    computed in float64 (the Gram norms square activations: float32 loses digits at gpt2 width)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, d) matrices with the same n; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 examples")
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear_cka is undefined for a constant input (all rows equal)")
    return (cross / (norm_x * norm_y)).item()


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """Xᶜ Xᶜᵀ (n, n) in float64, scaled to unit Frobenius norm."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    gram = x @ x.T
    norm = torch.linalg.matrix_norm(gram)
    if norm == 0:
        raise ValueError("linear CKA is undefined for a constant input (all rows equal)")
    return gram / norm


def aligned(grams_a: list[torch.Tensor], grams_b: list[torch.Tensor]) -> list[list[float]]:
    """[[⟨Ga_i, Gb_j⟩_F]] of unit-norm centred Gram matrices: the linear CKA of every pair."""
    return [[(ga * gb).sum().item() for gb in grams_b] for ga in grams_a]


def cka_matrix(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[list[float]]:
    """[[linear_cka(a_i, b_j)]] over two lists of (n, d) activation matrices, through the identity
    ‖Yᶜᵀ Xᶜ‖²_F = ⟨Xᶜ Xᶜᵀ, Yᶜ Yᶜᵀ⟩_F: one centred Gram matrix per input instead of one d x d product
    per pair (12 gpt2 blocks: 24 Grams instead of 288 products)."""
    grams_a = [centred_gram(x) for x in a]
    return aligned(grams_a, grams_a if b is a else [centred_gram(y) for y in b])


def cross_block_mean(matrix: list[list[float]]) -> float | None:
    """Mean CKA over the pairs of distinct blocks (the upper triangle); None with one block."""
    pairs = [matrix[i][j] for i in range(len(matrix)) for j in range(i + 1, len(matrix))]
    return sum(pairs) / len(pairs) if pairs else None


@torch.no_grad()
def block_states(model, task, layers: list[int], batch_size: int, device: str) -> dict[str, list[torch.Tensor]]:
    """Per pooling, one (n, C) float32 matrix per listed block: the block's output (the residual stream
    after it) at each dev example's last real token, and averaged over its real tokens."""
    from model.heads import last_token_state
    from task_data.batching import collate, encode, make_batches

    examples = task.dev
    encoded = encode(task.tokenizer, [task.to_text(e) for e in examples], task.max_length, task.truncation_side)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        model.transformer.h[layer].register_forward_hook(
            lambda module, inputs, output, layer=layer: outputs.__setitem__(
                layer, output[0] if isinstance(output, tuple) else output
            )
        )
        for layer in layers
    ]
    width = model.config.n_embd
    states = {p: [torch.empty(len(examples), width) for _ in layers] for p in POOLINGS}  # rows in dev order
    model.eval()
    try:
        for batch in make_batches([len(ids) for ids in encoded.ids], batch_size, bucket=True):
            ids, mask = collate([encoded.ids[i] for i in batch], side="right")
            ids, mask = ids.to(device), mask.to(device)
            model(ids, attention_mask=mask, return_logits=False)
            weights = mask.unsqueeze(-1).float()
            for position, layer in enumerate(layers):
                hidden = outputs[layer].float()
                states["last_token"][position][batch] = last_token_state(hidden, mask).cpu()
                states["mean"][position][batch] = ((hidden * weights).sum(1) / weights.sum(1)).cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return states


def compare(states_a: dict, states_b: dict | None) -> tuple[dict, dict]:
    """(matrices per pooling, summary per pooling)."""
    matrices, summary = {}, {}
    for pooling in POOLINGS:
        grams_a = [centred_gram(x) for x in states_a[pooling]]  # each block's Gram once, for every matrix
        entry = {"within_a": aligned(grams_a, grams_a)}
        info = {"a_cross_block_mean": cross_block_mean(entry["within_a"])}
        if states_b is not None:
            grams_b = [centred_gram(y) for y in states_b[pooling]]
            entry["within_b"] = aligned(grams_b, grams_b)
            entry["between"] = aligned(grams_a, grams_b)
            size = min(len(entry["between"]), len(entry["between"][0]))
            info["b_cross_block_mean"] = cross_block_mean(entry["within_b"])
            info["between_diagonal_mean"] = sum(entry["between"][i][i] for i in range(size)) / size
        matrices[pooling], summary[pooling] = entry, info
    return matrices, summary


def heatmaps(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(result["cka"][POOLINGS[0]])
    fig, axes = plt.subplots(
        len(POOLINGS), len(panels), figsize=(3.6 * len(panels), 3.3 * len(POOLINGS)), squeeze=False
    )
    names = {"within_a": "A", "within_b": "B"}
    for row, pooling in enumerate(POOLINGS):
        for col, panel in enumerate(panels):
            ax, matrix = axes[row][col], result["cka"][pooling][panel]
            rows_from = result["layers_b"] if panel == "within_b" else result["layers_a"]
            cols_from = result["layers_a"] if panel == "within_a" else result["layers_b"]
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(cols_from)), cols_from)
            ax.set_yticks(range(len(rows_from)), rows_from)
            if len(matrix) * len(matrix[0]) <= 64:  # numbers only where they stay readable
                for i, line in enumerate(matrix):
                    for j, value in enumerate(line):
                        color = "black" if value > 0.6 else "white"  # readable on viridis' yellow and its purple
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
            title = f"block x block, {names[panel]}" if panel in names else "A's block (rows) vs B's block"
            ax.set_title(f"{title}\n({pooling.replace('_', ' ')})", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
    # one line per model, wrapped to the figure's width (a run folder's name is longer than one panel)
    width = max(20, int(fig.get_figwidth() * 14))
    lines = [f"linear CKA on {result['n']} {result['task']} dev examples"]
    lines += [textwrap.fill(f"{k.upper()}: {Path(v).name or v}", width) for k, v in result["models"].items()]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # nothing clipped, whatever the names
    plt.close(fig)


def parse_layers(parser: argparse.ArgumentParser, words: list[str] | None, n_layer: int, which: str) -> list[int]:
    if not words:
        return sorted({0, n_layer // 2, n_layer - 1})  # first, middle, last: 0 6 11 on gpt2
    if words == ["all"]:
        return list(range(n_layer))
    try:
        layers = [int(w) for w in words]
    except ValueError:
        parser.error(f"--layers takes block indices or 'all', got {words}")
    bad = [layer for layer in layers if not 0 <= layer < n_layer]
    if bad or len(set(layers)) != len(layers):
        parser.error(f"--layers {words}: {which} has blocks 0..{n_layer - 1}, each listed once")
    return layers


@console.command("python -m experiments.cka")
def main(argv: list[str] | None = None) -> int:
    from model import CheckpointError, load_tokenizer
    from model.files import atomic_write_json
    from train.base.settings import TrainingSettings
    from train.cli.parse import ArgumentParser, check_data
    from train.run.trained import check_model_exists, load_model, run_record
    from train.tasks import get_task, labelled_tasks
    from train.trainer.distributed import auto_device
    from train.trainer.runtime import check_device

    parser = ArgumentParser(
        prog="python -m experiments.cka", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", metavar="RUN", help="one or two run folders / HF folders / hub ids")
    parser.add_argument("--task", choices=labelled_tasks(), default="sst", help="whose dev texts (default: sst)")
    parser.add_argument("--layers", nargs="+", default=None, help="block indices or 'all' (default: first middle last)")
    parser.add_argument("--n", type=int, default=512, help="dev examples, the first N (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for cka.json and cka.png")
    parser.add_argument("--batch_size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=None, help="token cap (default: the task's)")
    parser.add_argument(
        "--data_dir", default=None, help="task data (default: the first run's own, else $GPT2_DATA_DIR or data/cs224n)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder (default: the first run's own, else $GPT2_TOKENIZER or the hub)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu, as training), cpu, cuda, cuda:1, mps (default: auto)"
    )
    args = parser.parse_args(argv)
    if len(args.models) > 2:
        parser.error(f"give one model (block x block) or two (and between them), not {len(args.models)}")
    if args.n < 2 or args.batch_size < 1:
        parser.error("--n must be >= 2 and --batch_size >= 1")
    try:
        check_device(args.device)
        args.device = auto_device() if args.device == "auto" else args.device
        for model in args.models:  # a missing run is named as such, before any data are fetched for it
            check_model_exists(model)
    except ValueError as error:
        parser.error(str(error))
    task_class = get_task(args.task)
    recorded = run_record(args.models[0])  # a run folder: its own data and tokenizer folders unless given
    args.tokenizer = args.tokenizer or recorded.get("tokenizer")
    args.data_dir = check_data(parser, [args.task], args.data_dir or recorded.get("data_dir"), args.tokenizer)
    try:
        settings = TrainingSettings(dev_limit=args.n, test_limit=1, seed=0, max_length=args.max_length)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    try:
        models = [load_model(spec)[0] for spec in args.models]
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for model, spec in zip(models, args.models, strict=True):
        if model.transformer.prefix is not None:  # the blocks' states would hold n more positions
            parser.error(
                f"{spec}: a model with a prefix ahead of the input (prompt learning's virtual tokens); CKA compares "
                "the blocks' states at the input's own tokens, which the prefix shifts: not supported"
            )
    pairs = zip(models, args.models, strict=True)
    layers = [parse_layers(parser, args.layers, model.config.n_layer, spec) for model, spec in pairs]
    tokenizer = load_tokenizer(args.tokenizer)
    task = task_class(tokenizer, args.data_dir, settings, min(m.config.input_positions for m in models))
    if len(task.dev) < args.n:
        print(f"warning: {args.task} dev has {len(task.dev)} examples; using all of them", file=sys.stderr)
    states = []
    for model, model_layers in zip(models, layers, strict=True):
        states.append(block_states(model.to(args.device), task, model_layers, args.batch_size, args.device))
        model.cpu()
    collected = time.perf_counter()
    matrices, summary = compare(states[0], states[1] if len(states) > 1 else None)
    finished = time.perf_counter()
    result = {
        "models": {"a": args.models[0], **({"b": args.models[1]} if len(args.models) > 1 else {})},
        "task": args.task,
        "n": len(task.dev),
        "layers_a": layers[0],
        "layers_b": layers[-1],
        "summary": summary,
        "cka": matrices,
        "seconds": {
            "load_and_collect": round(collected - start, 2),
            "cka": round(finished - collected, 2),
            "total": round(finished - start, 2),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "cka.json", result)
    heatmaps(result, args.out / "cka.png")
    for pooling, info in summary.items():
        print(f"{pooling}: " + ", ".join(f"{k} {v:.4f}" for k, v in info.items() if v is not None))
    print(f"{result['seconds']['total']:.1f} s; wrote {args.out / 'cka.json'} and {args.out / 'cka.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
