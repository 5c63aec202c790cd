"""Command-line flags for every entry point, generated from GPT2Config (so every variant flag and
knob has a CLI name: --use_lora --lora_r 16 ...), plus the training flags. Unknown flags and
invalid combinations are rejected with a message."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from model.config import (
    FINE_TUNE_MODES,
    GRAPH_BACKENDS,
    KAN_BASES,
    KAN_INITS,
    KORA_TARGETS,
    LORA_INITS,
    LORA_TARGETS,
    GPT2Config,
)

# The stack comes from the checkpoint; these are not CLI overrides.
STACK_FIELDS = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
                "initializer_range", "name"}
CHOICES = {"lora_init": LORA_INITS, "kora_target": KORA_TARGETS, "fine_tune_mode": FINE_TUNE_MODES,
           "kan_init": KAN_INITS, "kan_base": KAN_BASES, "graph_backend": GRAPH_BACKENDS}
DEFAULT_LR = {"full-model": 1e-5, "last-linear-layer": 1e-3, "adapters": 2e-4}


def config_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(GPT2Config) if f.name not in STACK_FIELDS]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model variants and their knobs (GPT2Config fields)")
    for f in config_fields():
        default = f.default
        kwargs: dict[str, Any] = {"default": None, "help": f"(default: {default})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "lora_targets":
            kwargs.update(nargs="+", choices=list(LORA_TARGETS))
        elif f.name == "lora_layers":
            kwargs.update(nargs="+", type=int)
        elif f.name == "kan_grid_range":
            kwargs.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        elif f.name in ("kan_hidden", "graph_window") or isinstance(default, int):
            kwargs["type"] = int
        elif isinstance(default, float):
            kwargs["type"] = float
        else:
            kwargs["type"] = str
        if f.name in CHOICES:
            kwargs["choices"] = list(CHOICES[f.name])
        group.add_argument(f"--{f.name}", **kwargs)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("data and outputs")
    io.add_argument("--model", default="gpt2", help="hub id or local HF GPT-2 checkpoint folder (default: gpt2)")
    io.add_argument("--data_dir", default=None, help="task data (default: $GPT2_DATA_DIR or data/cs224n)")
    io.add_argument("--out_dir", default="runs", help="parent folder; each run gets a sub-folder named from its config")
    io.add_argument("--tokenizer", default=None, help="tokenizer folder (default: $GPT2_TOKENIZER or the hub)")
    io.add_argument("--train_limit", type=int, default=None, help="use the first N training examples")
    io.add_argument("--dev_limit", type=int, default=None, help="use the first N dev examples")
    io.add_argument("--test_limit", type=int, default=None, help="use the first N test examples")
    io.add_argument("--max_length", type=int, default=512, help="token cap per example (also capped by n_positions)")
    io.add_argument("--wandb", choices=["offline", "online", "disabled"], default="offline")
    io.add_argument("--wandb_project", default="gpt2-variants")
    io.add_argument("--wandb_group", default=None, help="wandb group (default: the task; ablation grids: the grid)")
    io.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--seed", type=int, default=11711)
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    opt.add_argument("--batch_size", type=int, default=8)
    opt.add_argument("--grad_accum", type=int, default=1)
    opt.add_argument("--lr", type=float, default=None,
                     help="default by fine_tune_mode: full-model 1e-5, last-linear-layer 1e-3, adapters 2e-4")
    opt.add_argument("--weight_decay", type=float, default=0.0)
    opt.add_argument("--warmup", type=float, default=0.0, help="warm-up steps (>= 1) or fraction of all steps (< 1)")
    opt.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="linear")
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--eval_every", type=int, default=0, help="evaluate every N optimizer steps (0: each epoch)")
    opt.add_argument("--save_every", type=int, default=0, help="also save the last checkpoint every N steps")
    opt.add_argument("--patience", type=int, default=0, help="stop after N evaluations without improvement (0: off)")
    opt.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    opt.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    opt.add_argument("--no_bucket", action="store_true", help="batches in data order instead of length buckets")
    opt.add_argument("--eval_train", action="store_true", help="also report accuracy on the training examples")
    opt.add_argument("--kan_l1", type=float, default=0.0, help="weight of the KAN L1 regulariser")
    opt.add_argument("--kan_entropy", type=float, default=0.0, help="weight of the KAN entropy regulariser")
    opt.add_argument("--dump_grads", default=None, help=argparse.SUPPRESS)  # test hook: gradients after step 1
    gen = parser.add_argument_group("sonnet generation (evaluation)")
    gen.add_argument("--temperature", type=float, default=1.2)
    gen.add_argument("--top_p", type=float, default=0.9)
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--max_new_tokens", type=int, default=160)
    add_config_flags(parser)
    return parser


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name) is not None}
    for key in ("lora_targets", "lora_layers", "kan_grid_range"):
        if key in values:
            values[key] = tuple(values[key])
    return values


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> GPT2Config:
    """Check the combination before anything is loaded; errors exit with a message (status 2)."""
    try:
        config = GPT2Config.from_preset("tiny", **config_overrides(args))
    except ValueError as error:
        parser.error(str(error))
    mode = config.resolved_fine_tune_mode
    if mode == "adapters" and not config.any_variant:
        parser.error("--fine_tune_mode adapters needs a variant flag (--use_lora, --use_kan, --use_graph, --use_kora)")
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max_steps must be >= 1")
    if args.lr is None:
        args.lr = DEFAULT_LR[mode]
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    return config


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
