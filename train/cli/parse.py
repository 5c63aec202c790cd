"""argv -> `RunSpec`: the command line of every entry point, validated once.

The flags come from typed settings: the training, output and runtime settings (train/base/settings.py),
each selected task's own settings, and one flag per GPT2Config field generated from the variant
registry (so a registered variant gets `--use_<name>` and its knobs with no edit here).

Validation happens before any weight, tokenizer or data file is read:
1. the settings classes check their own values (types, bounds, finiteness, cross-field rules);
2. `resolve_config`: the checkpoint's config.json alone is read (cheap) and every variant flag is
   validated against that real model size (e.g. `--graph_heads 12` on a 12-head gpt2 checkpoint),
   and a knob given for a variant that is not enabled is refused instead of silently ignored;
3. the checkpoint's identity is its content (model/fingerprint.py).
Every problem ends in one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

from model import tokenizer as tokenizers
from model.config import STACK_FIELDS, ModelSettings, field_hint, settings_fields
from model.fingerprint import checkpoint_identity
from model.loading import CheckpointError, read_checkpoint_config
from model.size import check_fits
from modules.kan import check_spline_kernel
from modules.registry import VARIANTS, enabled_variants, knob_owner, switches, used_knobs
from task_data.common import DataError, ensure_data
from train.base.settings import (
    CommandSettings,
    OutputSettings,
    RuntimeSettings,
    TrainingSettings,
    _argparse_type,
    add_flags,
    from_args,
    shown_default,
)
from train.run.experts import experts_from_runs
from train.run.spec import Checkpoint, RunSpec
from train.tasks import get_task, labelled_tasks
from train.trainer.distributed import rank_device
from train.trainer.lifecycle import BadInput
from train.trainer.runtime import check_device, resolve_precision

NOT_FLAGS = {*STACK_FIELDS, "name"}  # the stack comes from the checkpoint


def config_fields() -> list:
    return [f for f in settings_fields() if f.name not in NOT_FLAGS]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    owners = knob_owner()
    groups = {"model": parser.add_argument_group("model (GPT2Config fields)")}
    for name in VARIANTS:
        groups[name] = parser.add_argument_group(f"variant {name} (GPT2Config fields)")
    for f in config_fields():
        kwargs = _argparse_type(field_hint(f.name))
        if f.metadata.get("cli") == "json_file":
            kwargs = {"type": json_object_flag, "metavar": "PATH"}
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if "(default" not in help_text:  # a help text that explains its default says it once
            help_text += f" (default: {shown_default(f.default)})"
        group = groups[owners[f.name].name if f.name in owners else "model"]
        group.add_argument(f"--{f.name}", default=None, help=help_text, **kwargs)


def json_object_flag(path: str) -> dict:
    """A flag's JSON object: a file (e.g. a peft adapter_config.json), or the object itself written
    inline (`'{"r": 4}'`, handy in grid presets); an error names the file and line."""
    import json

    inline = path.lstrip()[:1] in ("{", "[")  # JSON written inline (a list is refused below, as JSON)
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


# In a library call (train.spec_from_argv) a bad flag raises BadInput instead of exiting the process.
RAISING = contextvars.ContextVar("raising_parse_errors", default=False)


@contextlib.contextmanager
def raising_errors():
    """Parsers raise BadInput (the message) instead of printing it and exiting 2."""
    token = RAISING.set(True)
    try:
        yield
    finally:
        RAISING.reset(token)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error plus a hint, instead of the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        if RAISING.get():
            raise BadInput(message)
        self.exit(2, f"error: {message}\n(run with --help for every flag and its default)\n")


def program_name() -> str:
    """How the user started this command, for usage lines: `python -m train`, `python -m train.sonnet`."""
    path = Path(sys.argv[0])
    if path.parent.name == "train":
        return "python -m train" if path.stem == "__main__" else f"python -m train.{path.stem}"
    return path.name


def build_parser(description: str, task_names: list[str] = ()) -> ArgumentParser:
    """Every flag a command accepts: the checkpoint, the training / output / runtime settings, the
    own settings of `task_names` (only those), and the GPT2Config fields."""
    parser = ArgumentParser(
        prog=program_name(), description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("checkpoint")
    model.add_argument("--model", default=None, help="hub id or local HF GPT-2 checkpoint folder (default: gpt2)")
    for cls in (TrainingSettings, OutputSettings, RuntimeSettings):
        add_flags(parser, cls)
    for name in dict.fromkeys(task_names):
        get_task(name).add_flags(parser)
    add_config_flags(parser)
    return parser


def hide_flags(parser: argparse.ArgumentParser, names: set[str]) -> None:
    """Leave `names` (flag names without dashes) out of --help and the usage line. They still parse,
    so a command that refuses them can say why, instead of argparse's "unrecognized arguments"."""
    for action in parser._actions:
        if any(option.lstrip("-") in names for option in action.option_strings):
            action.help = argparse.SUPPRESS


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The GPT2Config fields given on the command line (None = not given)."""
    values = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}
    if isinstance(values.get("peft_config"), dict) and "peft_method" not in values:
        saved_type = values["peft_config"].get("peft_type")  # a peft adapter_config.json names its method
        if saved_type is not None:
            values["peft_method"] = str(saved_type).lower()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def resolve_config(args: argparse.Namespace, checkpoint_source: str | None = None, base_identity: Any = None):
    """The run's GPT2Config: the checkpoint's config.json (only that file is read) + the variant flags,
    validated at that real size. `base_identity`: the checkpoint's content identity, which X-LoRA's
    expert runs must share (train/run/experts.py). Raises ValueError / CheckpointError."""
    overrides = config_overrides(args)
    model = args.model or "gpt2"
    if base_identity is not None:
        overrides = experts_from_runs(overrides, base_identity)
    config = read_checkpoint_config(checkpoint_source or model, name=str(model), **overrides)
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
    if mode == "last-linear-layer" and config.any_variant:
        names = ", ".join(f"--use_{v.name}" for v in config.variants)
        raise ValueError(
            f"--fine_tune_mode last-linear-layer trains only the task head, so {names} would add layers that never "
            "train (and a KAN FFN would replace the pretrained FFN by a frozen random one); drop the variant flag, "
            "or use --fine_tune_mode adapters / full-model"
        )
    return config


def check_model_flag(model: str) -> None:
    """`--model` pointing at one of our run folders (not a checkpoint) gets a message that says so."""
    path = Path(model)
    record = path / "config.json"
    if not record.is_file() or not ((path / "checkpoints").is_dir() or (path / "log.jsonl").is_file()):
        return  # a checkpoint folder (no run files): its config.json is read once, by resolve_config
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return  # read_checkpoint_config reports a broken config.json
    if isinstance(saved, dict) and ("run" in saved and "identity" in saved):
        raise ValueError(
            f"--model {model} is a run folder of this project, not a checkpoint: continue it with the same flags "
            f"plus --resume, train from it with python -m train.transfer --source_run {model}, score it with "
            f"python -m train.evaluate --model {model}, or export it (docs/variants.md, Adapters on disk)"
        )


def check_out_dir(out_dir: str) -> None:
    path = Path(out_dir)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out_dir {out_dir}: {parent} is a file, not a folder")


def build_spec(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    label: str,
    task_names: list[str],
    extra_settings: dict[str, CommandSettings] | None = None,
    checkpoint_source: str | None = None,
    transfer_from: dict | None = None,
    argv: list[str] = (),
) -> RunSpec:
    """The run's `RunSpec`, validated once (exits 2 with one `error:` line): settings, the resolved
    config at the checkpoint's real size, the default lr of the fine-tune mode, the checkpoint's
    content identity (from `checkpoint_source` instead of --model when given: a checkpoint the
    caller wrote elsewhere with the same bytes)."""
    try:
        training = from_args(TrainingSettings, args)
        output = from_args(OutputSettings, args)
        runtime = from_args(RuntimeSettings, args)
        check_device(runtime.device)
        check_spline_kernel(runtime.kan_kernel, rank_device(runtime.device, 0, 1))
        check_out_dir(output.out_dir)
        settings = {n: from_args(get_task(n).settings, args) for n in task_names if get_task(n).settings}
        settings.update(extra_settings or {})
        unlabelled = [n for n in task_names if n not in labelled_tasks()]
        if training.train_fraction is not None and unlabelled:
            raise ValueError(f"--train_fraction draws a share stratified by label; {unlabelled[0]} has no labels")
        model = args.model or "gpt2"
        check_model_flag(model)
        local = Path(str(model)).expanduser()
        # a local folder is recorded as an absolute path, so the run's record resolves from any directory
        # (train.evaluate, transfer); the identity is by content either way
        source = str(local.resolve()) if local.exists() else str(model)
        checkpoint = Checkpoint(source, checkpoint_identity(checkpoint_source or model))
        config = resolve_config(args, checkpoint_source, checkpoint.identity)
        # before anything is built or allocated; a step holds at most batch_size x the length cap tokens
        caps = [getattr(get_task(n), "default_max_length", None) or config.n_positions for n in task_names]
        length = min(training.max_length or config.n_positions, max(caps), config.n_positions)
        # recomputed in backward under --grad_checkpointing: not counted (the per-block peak is small)
        tokens = 0 if runtime.grad_checkpointing else training.batch_size * length
        device = rank_device(runtime.device, 0, 1)
        try:
            precision = resolve_precision(runtime.precision, device)
        except (AssertionError, RuntimeError):  # a device this torch cannot ask: count fp32, the larger
            precision = "fp32"
        check_fits(config, device, tokens, precision)
        training = training.resolved(config.resolved_fine_tune_mode)
    except (ValueError, CheckpointError) as error:
        parser.error(flags_as_typed(str(error), args))
    return RunSpec(
        label=label,
        tasks=tuple(task_names),
        config=config,
        checkpoint=checkpoint,
        training=training,
        task_settings=settings,
        output=output,
        runtime=runtime,
        transfer_from=transfer_from,
        argv=tuple(argv),
    )


def flags_as_typed(message: str, args: argparse.Namespace) -> str:
    """An error names a config field the user gave on the command line as the flag they typed
    (`GPT2Config.lora_r` -> `--lora_r`); a value read from the checkpoint's config.json keeps its name."""
    typed = config_overrides(args)
    return re.sub(r"GPT2Config\.(\w+)", lambda m: f"--{m[1]}" if m[1] in typed else m[0], message)


def check_inputs(parser: argparse.ArgumentParser, spec: RunSpec) -> Path:
    """The spec's task data and tokenizer (see `check_data`)."""
    return check_data(parser, spec.tasks, spec.output.data_dir, spec.output.tokenizer)


def check_data(parser: argparse.ArgumentParser, tasks, data_dir: str | None, tokenizer: str | None) -> Path:
    """The task data (fetched into the cache folder when missing and no --data_dir was given) and the
    tokenizer, checked before any weights load; exits 2 with one line. Returns the data folder."""
    try:
        files = sorted({name for task in tasks for name in get_task(task).data_files()})
        folder = ensure_data(files, data_dir)
        for task in tasks:
            get_task(task).check_files(folder)
        tokenizers.load_tokenizer(tokenizer)  # looked up on the module, so tests can replace it
    except (DataError, tokenizers.TokenizerNotFound) as error:
        parser.error(str(error))
    return folder


def render_argv(spec: RunSpec, base: Any = None) -> list[str]:
    """The command line of `python -m train` that parses back to `spec` (the inverse of `build_spec` for a
    single-task run): `--task`, `--model`, every setting that differs from its default, and every config
    field that differs from the checkpoint's own (`base`: its config as read, default read here)."""
    if len(spec.tasks) != 1 or spec.label != spec.tasks[0] or spec.transfer_from is not None:
        raise ValueError(f"only a plain single-task run renders as `python -m train` flags, not {spec.label!r}")
    argv = ["--task", spec.tasks[0], "--model", spec.checkpoint.source]
    for settings in (spec.training, *spec.task_settings.values(), spec.output, spec.runtime):
        for f in type(settings).knobs():
            value = getattr(settings, f.name)
            if value != f.default:
                argv += _flag(f.name, value, switch=f.default is False)
    base = base if base is not None else read_checkpoint_config(spec.checkpoint.source)
    for f in config_fields():
        value = getattr(spec.config, f.name)
        if value != getattr(base, f.name):
            argv += _flag(f.name, value, switch=False)
    return argv


def _flag(name: str, value: Any, switch: bool) -> list[str]:
    if isinstance(value, bool):
        if switch:
            return [f"--{name}"] if value else []
        return [f"--{name}" if value else f"--no-{name}"]
    if isinstance(value, tuple):
        return [f"--{name}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{name}", json.dumps(value, sort_keys=True)]
    return [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
