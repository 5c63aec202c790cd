"""Typed settings of a run, declared once with the `knob()`/`Settings` machinery `GPT2Config` uses,
so each flag's type, default, help, bounds and JSON come from one place:

- `TrainingSettings`: what is computed (seed, epochs, lr, schedule, limits ...): part of a run's identity;
- `OutputSettings`: where results go and how they are logged and saved: not part of it;
- `RuntimeSettings`: how the same maths is executed (device, precision, compile ...): not part of it;
- each task's own settings (`SonnetSettings`, `ParaphraseSettings`) and `MultitaskSettings`: part of it.

Command-line flags are generated from these classes (`add_flags`), parsed with every default None so
that "given" is known, and turned back into settings by `from_args` (which validates: a bad value
ends in one `--flag must be ...` error). Which settings count towards a run's identity is a rule by
*type* (train/run/spec.py), so a new field is covered the moment it is declared.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

from modules.variant import JSONObject, Settings, knob

DEFAULT_LR = {"full-model": 1e-5, "last-linear-layer": 1e-3, "adapters": 2e-4}
# Where a grid's [tune] stage searches the learning rate of a run that trains more than adapters (an adapter
# run searches its variants' own ranges: modules/variant.py `LrPrior`). (low, high, source)
MODE_LR_PRIORS = {
    "full-model": (
        1e-5,
        1e-4,
        "full fine-tuning of GPT-2/BERT-size models is tuned over 1e-5..5e-5 (Devlin et al., 2019; the course's "
        "1e-5); peft's method comparison runs it at 1e-5; widened to 1e-4 for small data",
    ),
    "last-linear-layer": (
        1e-4,
        1e-2,
        "a linear probe on frozen features trains a freshly initialised head: the course's 1e-3, a decade either side",
    ),
}


@dataclass(frozen=True)
class CommandSettings(Settings):
    """Settings given on the command line: errors name the flag (`--lr must be ...`)."""

    owner: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the --help group

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class TrainingSettings(CommandSettings):
    title: ClassVar[str] = "optimisation and data (part of the run's identity)"

    seed: int = knob(11711, "random seed of weights, data order, dropout and sampling")
    epochs: int = knob(10, "training epochs", low=1)
    max_steps: int | None = knob(None, "stop after this many optimizer steps (default: none)", low=1)
    batch_size: int = knob(8, "training batch size", low=1)
    eval_batch_size: int = knob(32, "batch size of evaluation", low=1)
    grad_accum: int = knob(1, "micro-batches per optimizer step", low=1)
    lr: float | None = knob(
        None,
        "learning rate (default by fine_tune_mode: full-model 1e-5, last-linear-layer 1e-3, adapters 2e-4)",
        low=0,
        low_open=True,
    )
    weight_decay: float = knob(0.0, "AdamW weight decay", low=0)
    warmup: float = knob(0.0, "warm-up steps (>= 1) or fraction of all steps (< 1)", low=0)
    schedule: Literal["cosine", "linear", "constant"] = knob("linear", "learning-rate schedule after warm-up")
    max_grad_norm: float = knob(1.0, "gradient clipping norm", low=0, low_open=True)
    eval_every: int = knob(0, "evaluate every N optimizer steps (0: each epoch)", low=0)
    patience: int = knob(0, "stop after N evaluations without improvement (0: off)", low=0)
    train_limit: int | None = knob(None, "use the first N training examples (default: all)", low=1)
    train_fraction: float | None = knob(
        None,
        "train on a seeded (--seed), stratified share of the training examples, e.g. 0.01; every label must be "
        "in it (classification tasks; default: all)",
        low=0,
        low_open=True,
        high=1,
    )
    dev_limit: int | None = knob(None, "use the first N dev examples (default: all)", low=1)
    test_limit: int | None = knob(None, "use the first N test examples (default: all)", low=1)
    max_length: int | None = knob(512, "token cap per example (also capped by the task's cap and n_positions)", low=1)
    no_bucket: bool = knob(False, "batches in data order instead of length buckets")

    def resolved(self, fine_tune_mode: str) -> TrainingSettings:
        """With the default learning rate of the fine-tune mode filled in."""
        return self if self.lr is not None else dataclasses.replace(self, lr=DEFAULT_LR[fine_tune_mode])


@dataclass(frozen=True)
class OutputSettings(CommandSettings):
    title: ClassVar[str] = "data, outputs and logging (not part of the run's identity)"

    out_dir: str = knob("runs", "parent folder; each run gets a sub-folder named from its settings")
    data_dir: str | None = knob(None, "task data (default: $GPT2_DATA_DIR or data/cs224n)")
    tokenizer: str | None = knob(None, "tokenizer folder (default: $GPT2_TOKENIZER or the hub)")
    wandb: Literal["offline", "online", "disabled"] = knob("offline", "wandb mode")
    wandb_project: str = knob("gpt2-variants", "wandb project")
    wandb_group: str | None = knob(
        None, "the grid this run belongs to; its wandb group is GROUP-TASK (default: none, the group is the task)"
    )
    label: str | None = knob(
        None, "the grid's name for this configuration, in wandb's config and the report (default: the variant tags)"
    )
    resume: bool = knob(
        False, "continue the run folder of these settings from its last checkpoint (a finished run: nothing to do)"
    )
    overwrite: bool = knob(
        False, "clear an existing run folder of these settings (logs, checkpoints, wandb, its runs.tsv row) first"
    )
    extend_epochs: int | None = knob(
        None,
        "with --resume: train N epochs more than the run was started with; the lr schedule is re-planned over "
        "the new total (default: none)",
        low=1,
    )
    log_every: int = knob(50, "when stderr is not a terminal, print a progress line every N steps (0: never)", low=0)
    save_every: int = knob(0, "also save the last checkpoint every N steps (0: off)", low=0)
    save_every_minutes: float = knob(
        30.0, "also save the last checkpoint when this many minutes passed since the last save (0: off)", low=0
    )
    spike_factor: float = knob(
        10.0,
        "a step loss above this many times the running median of healthy losses is a spike: the checkpoint whose "
        "weights gave it is not kept (0: off)",
        low=0,
    )
    blowup_factor: float = knob(
        10.0,
        "a step loss above this many times max(the task's first loss, ln(vocab size)) is divergence from step 1 on: "
        "the run stops with exit 3, keeping no checkpoint taken after it (0: off)",
        low=0,
    )
    eval_train: bool = knob(False, "also report accuracy on the training examples")
    predict_test: bool = knob(
        True,
        "predict the test split once, after training, with the best checkpoint's weights (--no-predict_test: "
        "the test split is never read, as in a grid's learning-rate tuning runs)",
    )
    stage: Literal["tune", "final"] | None = knob(
        None,
        "the grid stage this run belongs to (experiments/ablate.py's [tune] table sets it): tune = a learning-rate "
        "trial, final = a run at the chosen rate; runs.tsv and wandb (job type, config) carry it",
    )
    lr_chosen_by: tuple[str, ...] | None = knob(
        None, "the tuning runs whose dev scores chose this run's --lr (set by experiments/ablate.py's [tune] stage)"
    )

    def validate(self) -> None:
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ValueError("--spike_factor must be > 1 (0: off)")
        if self.blowup_factor != 0 and self.blowup_factor <= 1:
            raise ValueError("--blowup_factor must be > 1 (0: off)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pass one")
        if self.extend_epochs and not self.resume:
            raise ValueError("--extend_epochs N extends an existing run: pass it with --resume")


@dataclass(frozen=True)
class RuntimeSettings(CommandSettings):
    title: ClassVar[str] = "runtime: how the maths is executed (not part of the run's identity)"

    device: str = knob("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16"] = knob(
        "auto",
        "compute precision: bf16 autocast (weights and optimizer stay fp32) or fp32 (with TF32 matmuls on CUDA); "
        "auto = bf16 on a CUDA GPU that supports it, else fp32",
    )
    loss_precision: Literal["run", "fp32"] = knob(
        "run",
        "the LM-head loss's matmuls: run = at the run's precision (bf16 with fp32 accumulation in a bf16 run, as HF's "
        "LM head under autocast; softmax and loss in fp32), fp32 = always fp32",
    )
    compile: bool = knob(
        False,
        "torch.compile each transformer block (lengths are padded to a multiple of 64 so length buckets reuse a "
        "few graphs)",
    )
    fast_step: Literal["off", "on"] = knob(
        "off",
        "on: static batch shapes (length buckets, a fixed batch size), no host sync in the step, and on CUDA the "
        "whole training step and evaluation as CUDA graphs (train/trainer/graphs.py; not with dropout yet: "
        "docs/gpu.md)",
    )
    kan_kernel: Literal["torch", "triton"] = knob(
        "torch",
        "KAN layers' spline GEMM: torch (bases written to memory, then a GEMM) or triton (CUDA only: bases built in "
        "registers inside the matmul, modules/kan_triton.py; equal within float rounding)",
    )
    grad_checkpointing: bool = knob(
        False,
        "recompute each block's activations in backward instead of storing them (less memory, ~30% more compute, "
        "same gradients)",
    )


@dataclass(frozen=True)
class MultitaskSettings(CommandSettings):
    title: ClassVar[str] = "multitask (part of the run's identity)"

    task_sampling: Literal["proportional", "uniform", "temperature"] = knob(
        "proportional", "how batches are drawn from the tasks"
    )
    sampling_temperature: float = knob(2.0, "p ∝ n^(1/T)", low=0, low_open=True)
    task_weights: JSONObject = knob(
        JSONObject(), "loss weight per task, as TASK=WEIGHT (default: 1 each)", cli="weights"
    )


# ---------------------------------------------------------------- flags from settings


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


def shown_default(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return "none" if not value else ", ".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type[Settings], title: str | None = None) -> None:
    """One flag per field of `cls`; every default is None (so a given flag is known) and shown once in
    the help. A bool that is off by default is a plain switch (`--resume`)."""
    group = parser.add_argument_group(title or getattr(cls, "title", "") or cls.__name__)
    hints = cls.hints()
    for f in cls.knobs():
        hint = hints[f.name]
        if hint is bool and f.default is False:
            kwargs: dict[str, Any] = {"action": "store_true"}
        elif f.metadata.get("cli") == "weights":
            kwargs = {"nargs": "*", "metavar": "TASK=WEIGHT"}
        else:
            kwargs = _argparse_type(hint)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if "(default" not in help_text:
            help_text += f" (default: {shown_default(f.default)})"
        group.add_argument(f"--{f.name}", default=None, help=help_text, **kwargs)


def given(cls: type[Settings], args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` set on the command line (a store_true flag left off counts as not given)."""
    values = {}
    for f in cls.knobs():
        value = getattr(args, f.name, None)
        if value is None or (value is False and f.default is False):
            continue
        values[f.name] = tuple(value) if isinstance(value, list) and f.metadata.get("cli") != "weights" else value
    return values


def from_args(cls: type[Settings], args: argparse.Namespace, **overrides: Any) -> Any:
    """`cls` from the parsed flags (defaults for those not given); ValueError names the flag."""
    return cls(**{**given(cls, args), **overrides})


def task_weights(items: list[str] | dict, tasks: list[str]) -> dict[str, float]:
    """`--task_weights sst=2 quora=0.5` as {task: weight}; ValueError on a malformed item."""
    if isinstance(items, dict):
        return {str(k): float(v) for k, v in items.items()}
    weights: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if name not in tasks or not weight >= 0 or weight == float("inf"):
            raise ValueError(
                f"--task_weights expects TASK=WEIGHT (finite weight >= 0) for TASK in {tasks}, got {item!r}"
            )
        weights[name] = weight
    return weights
