"""Command-line flags for every entry point: the training flags, each selected task's own flags, and
one flag per GPT2Config field generated from the variant registry (so a registered variant gets
`--use_<name>` and its knobs with no edit here), plus validation of the whole combination.

Validation happens in two stages, both before any weight, tokenizer or data file is read:
1. `check_training_flags`: values that need no model (limits, intervals, generation settings ...);
2. `resolve_config`: the checkpoint's config.json alone is read (cheap) and every variant flag is
   validated against that real model size (e.g. `--graph_heads 12` on a 12-head gpt2 checkpoint),
   and a knob given for a variant that is not enabled is refused instead of silently ignored.
Every problem ends in one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch

from datasets.common import DataError, ensure_data
from model import tokenizer as tokenizers
from model.config import STACK_FIELDS, ModelSettings, field_hint, settings_fields
from model.loading import CheckpointError, read_checkpoint_config
from modules.registry import VARIANTS, enabled_variants, knob_owner, switches, used_knobs
from train.tasks import labelled_tasks

DEFAULT_LR = {"full-model": 1e-5, "last-linear-layer": 1e-3, "adapters": 2e-4}
NOT_FLAGS = {*STACK_FIELDS, "name"}  # the stack comes from the checkpoint


def config_fields() -> list:
    return [f for f in settings_fields() if f.name not in NOT_FLAGS]


def _argparse_type(hint: Any) -> dict[str, Any]:
    """argparse keywords for a knob's type hint."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return _argparse_type(inner[0])
    if origin is Literal:
        choices = list(get_args(hint))
        return {"type": type(choices[0]), "choices": choices}
    if origin is tuple:
        args = get_args(hint)
        element = _argparse_type(args[0])
        nargs: Any = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        return {**element, "nargs": nargs}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": hint}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    owners = knob_owner()
    groups = {"model": parser.add_argument_group("model (GPT2Config fields)")}
    for name in VARIANTS:
        groups[name] = parser.add_argument_group(f"variant {name} (GPT2Config fields)")
    for f in config_fields():
        kwargs = _argparse_type(field_hint(f.name))
        if f.metadata.get("cli") == "json_file":
            kwargs = {"type": read_json_object, "metavar": "PATH"}
        default = f.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        group = groups[owners[f.name].name if f.name in owners else "model"]
        group.add_argument(
            f"--{f.name}", default=None, help=f"{f.metadata.get('help', '')} (default: {shown})", **kwargs
        )


def read_json_object(path: str) -> dict:
    """A flag's JSON object: a file (e.g. a peft adapter_config.json), or the object itself written
    inline (`'{"r": 4}'`, handy in grid presets); an error names the file and line."""
    import json

    inline = path.lstrip().startswith("{")
    source = "inline JSON" if inline else path
    try:
        value = json.loads(path if inline else Path(path).read_text())
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{source} line {error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error plus a hint, instead of the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}\n(run with --help for every flag and its default)\n")


def program_name() -> str:
    """How the user started this command, for usage lines: `python -m train`, `python -m train.sonnet`."""
    path = Path(sys.argv[0])
    if path.parent.name == "train":
        return "python -m train" if path.stem == "__main__" else f"python -m train.{path.stem}"
    return path.name


def build_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(
        prog=program_name(), description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("data and outputs")
    io.add_argument("--model", default="gpt2", help="hub id or local HF GPT-2 checkpoint folder (default: %(default)s)")
    io.add_argument("--data_dir", default=None, help="task data (default: $GPT2_DATA_DIR or data/cs224n)")
    io.add_argument(
        "--out_dir",
        default="runs",
        help="parent folder; each run gets a sub-folder named from its settings (default: %(default)s)",
    )
    io.add_argument("--tokenizer", default=None, help="tokenizer folder (default: $GPT2_TOKENIZER or the hub)")
    io.add_argument("--train_limit", type=int, default=None, help="use the first N training examples (default: all)")
    io.add_argument(
        "--train_fraction",
        type=float,
        default=None,
        help="train on a seeded (--seed), stratified share of the training examples, e.g. 0.01; every label must "
        "be in it (classification tasks; default: all)",
    )
    io.add_argument("--dev_limit", type=int, default=None, help="use the first N dev examples (default: all)")
    io.add_argument("--test_limit", type=int, default=None, help="use the first N test examples (default: all)")
    io.add_argument(
        "--max_length",
        type=int,
        default=512,
        help="token cap per example (also capped by the task's cap and n_positions; default: %(default)s)",
    )
    io.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default="offline",
        help="wandb mode (default: %(default)s)",
    )
    io.add_argument("--wandb_project", default="gpt2-variants", help="(default: %(default)s)")
    io.add_argument("--wandb_group", default=None, help="wandb group (default: the task; ablation grids: the grid)")
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue the run folder of these settings from its last checkpoint (a finished run: nothing to do; "
        "default: off)",
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="clear an existing run folder of these settings (logs, checkpoints, wandb, its runs.tsv row) first "
        "(default: off)",
    )
    io.add_argument(
        "--extend_epochs",
        type=int,
        default=None,
        help="with --resume: train N epochs more than the run was started with; the lr schedule is re-planned "
        "over the new total (default: none)",
    )
    io.add_argument(
        "--log_every",
        type=int,
        default=50,
        help="when stderr is not a terminal, print a progress line every N steps (0: never; default: %(default)s)",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--seed", type=int, default=11711, help="(default: %(default)s)")
    opt.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    opt.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (default: none)")
    opt.add_argument("--batch_size", type=int, default=8, help="(default: %(default)s)")
    opt.add_argument("--eval_batch_size", type=int, default=32, help="batch size of evaluation (default: %(default)s)")
    opt.add_argument("--grad_accum", type=int, default=1, help="(default: %(default)s)")
    opt.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default by fine_tune_mode: full-model 1e-5, last-linear-layer 1e-3, adapters 2e-4",
    )
    opt.add_argument("--weight_decay", type=float, default=0.0, help="(default: %(default)s)")
    opt.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="warm-up steps (>= 1) or fraction of all steps (< 1) (default: %(default)s)",
    )
    opt.add_argument(
        "--schedule", choices=["cosine", "linear", "constant"], default="linear", help="(default: %(default)s)"
    )
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="(default: %(default)s)")
    opt.add_argument(
        "--eval_every", type=int, default=0, help="evaluate every N optimizer steps (0: each epoch; default: 0)"
    )
    opt.add_argument(
        "--save_every", type=int, default=0, help="also save the last checkpoint every N steps (0: off; default: 0)"
    )
    opt.add_argument(
        "--save_every_minutes",
        type=float,
        default=30.0,
        help="also save the last checkpoint when this many minutes passed since the last save (0: off; "
        "default: %(default)s)",
    )
    opt.add_argument(
        "--spike_factor",
        type=float,
        default=10.0,
        help="a step loss above this many times the running median of healthy losses is a spike: the checkpoint "
        "whose weights gave it is not kept (0: off; default: %(default)s)",
    )
    opt.add_argument(
        "--patience", type=int, default=0, help="stop after N evaluations without improvement (0: off; default: 0)"
    )
    opt.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps (default: %(default)s)"
    )
    opt.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="compute precision: bf16 autocast (weights and optimizer stay fp32) or fp32 (with TF32 matmuls on "
        "CUDA); auto = bf16 on a CUDA GPU that supports it, else fp32 (default: %(default)s)",
    )
    opt.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (lengths are padded to a multiple of 64 so length buckets "
        "reuse a few graphs; default: off)",
    )
    opt.add_argument(
        "--fast_step",
        choices=["off", "on"],
        default="off",
        help="on: static batch shapes (length buckets, a fixed batch size), no host sync in the step, and on "
        "CUDA the whole training step and evaluation as CUDA graphs (train/graphs.py; not with dropout yet: "
        "README) (default: %(default)s)",
    )
    opt.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute each block's activations in backward instead of storing them (less memory, ~30%% more "
        "compute, same gradients; default: off)",
    )
    opt.add_argument(
        "--no_bucket", action="store_true", help="batches in data order instead of length buckets (default: off)"
    )
    opt.add_argument(
        "--eval_train", action="store_true", help="also report accuracy on the training examples (default: off)"
    )
    add_config_flags(parser)
    return parser


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The GPT2Config fields given on the command line (None = not given)."""
    values = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}
    if isinstance(values.get("peft_config"), dict) and "peft_method" not in values:
        saved_type = values["peft_config"].get("peft_type")  # a peft adapter_config.json names its method
        if saved_type is not None:
            values["peft_method"] = str(saved_type).lower()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def check_counts(args: argparse.Namespace, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Counts must be >= 1; an `optional` one may be left out (None = all / no cap)."""
    for name in required:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    for name in optional:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1 (leave it out for 'all')")


def check_training_flags(args: argparse.Namespace) -> None:
    """Values that need no model; ValueError names the flag."""
    check_counts(
        args,
        ("epochs", "batch_size", "grad_accum", "eval_batch_size"),
        ("max_steps", "train_limit", "dev_limit", "test_limit", "max_length", "extend_epochs"),
    )
    for name in ("eval_every", "save_every", "patience", "log_every", "save_every_minutes"):
        if getattr(args, name, 0) < 0:
            raise ValueError(f"--{name} must be >= 0 (0: off)")
    if args.spike_factor != 0 and args.spike_factor <= 1:
        raise ValueError("--spike_factor must be > 1 (0: off)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one")
    fraction = getattr(args, "train_fraction", None)
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--train_fraction must be in (0, 1], got {fraction}")
    if getattr(args, "warmup", 0.0) < 0:
        raise ValueError("--warmup must be >= 0")
    if getattr(args, "weight_decay", 0.0) < 0:
        raise ValueError("--weight_decay must be >= 0")
    if getattr(args, "max_grad_norm", 1.0) <= 0:
        raise ValueError("--max_grad_norm must be > 0")
    if args.lr is not None and args.lr <= 0:
        raise ValueError("--lr must be > 0")
    check_device(args.device)


def check_device(name: str) -> None:
    kind = name.split(":")[0]
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} unknown; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    index = name.partition(":")[2]
    if index and (kind not in ("cuda", "mps") or not index.isdigit()):
        raise ValueError(f"--device {name!r} unknown; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine")


def resolve_config(args: argparse.Namespace, config_source: str | None = None):
    """The run's GPT2Config: the checkpoint's config.json (only that file is read) + the variant flags,
    validated at that real size. Fills in the default `--lr`. Raises ValueError / CheckpointError."""
    overrides = config_overrides(args)
    config = read_checkpoint_config(config_source or args.model, **overrides).replace(name=str(args.model))
    model_fields = set(ModelSettings.__dataclass_fields__)
    allowed = model_fields | set(switches()) | used_knobs(config)
    unused = sorted(k for k in overrides if k not in allowed)
    if unused:
        on = [v.name for v in enabled_variants(config)] or ["none"]
        owners = knob_owner()
        # Suggest only switches that are off (with --use_kan --use_lora, the KAN-FFN knobs have no switch to add).
        needs = sorted(
            {
                f"--{f.name}"
                for k in unused
                for f in owners[k].settings.knobs()
                if f.metadata["switch"] and not getattr(config, f.name)
            }
        )
        raise ValueError(
            f"{', '.join('--' + k for k in unused)} given but no enabled variant uses "
            f"{'it' if len(unused) == 1 else 'them'} (enabled: {', '.join(on)})"
            + (f"; did you mean to add {' / '.join(needs)}?" if needs else "")
        )
    mode = config.resolved_fine_tune_mode
    if mode == "adapters" and not config.any_variant:
        raise ValueError(
            "--fine_tune_mode adapters needs a variant flag (" + ", ".join(f"--{s}" for s in switches()) + ")"
        )
    if args.lr is None:
        args.lr = DEFAULT_LR[mode]
    return config


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace, tasks=(), config_source: str | None = None):
    """Both validation stages; exits 2 with one line on any problem."""
    try:
        check_training_flags(args)
        for task in tasks:
            task.check_flags(args)
            if getattr(args, "train_fraction", None) is not None and task.name not in labelled_tasks():
                raise ValueError(f"--train_fraction draws a share stratified by label; {task.name} has no labels")
        return resolve_config(args, config_source)
    except (ValueError, CheckpointError) as error:
        parser.error(str(error))


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, tasks) -> Path:
    """The task data (fetched into the cache folder when missing and no --data_dir was given) and the
    tokenizer, checked before any weights load; exits 2 with one line."""
    try:
        folder = ensure_data(sorted({name for task in tasks for name in task.data_files()}), args.data_dir)
        tokenizers.load_tokenizer(args.tokenizer)  # looked up on the module, so tests can replace it
    except (DataError, tokenizers.TokenizerNotFound) as error:
        parser.error(str(error))
    return folder


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 on a CUDA GPU with bf16 support (flash attention and tensor cores), fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def autocast_for(device: str, precision: str, cache: bool = True) -> torch.autocast:
    """bf16 autocast for a resolved precision of `bf16`, a no-op context for `fp32`; training, its
    evaluations and `train.evaluate` all compute under this one context, so they score alike.
    `cache=False` inside a CUDA graph (autocast's cache of bf16 weight copies would be baked in)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)


@contextlib.contextmanager
def cuda_kernel_settings():
    """While the block runs (no effect on the CPU), then the caller's own settings again, so an in-process
    caller (a notebook, a test) keeps exact fp32 and its attention backends afterwards:
    - TF32 tensor cores for fp32 matmuls;
    - no cuDNN attention: PyTorch prefers it on Hopper, and it builds a plan for every new sequence
      length, measured on an H100 (torch 2.11, bf16, B=32, 12 heads) at 110-185 ms per new length for
      forward+backward against ~1 ms with flash / memory-efficient attention. Our batches are padded to
      their longest example, so nearly every batch is a new length."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.cudnn_sdp_enabled(),
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.backends.cuda.enable_cudnn_sdp(saved[2])
